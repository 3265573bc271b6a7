"""Data that is valid but odd, and mistakes that look valid (a session 43 probe of about 150
inputs): each trains what it says, or says what it did."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_byo import _digit_pngs
from test_sources import GREY8, IMG_INPUT, X_IN, _ce, _text, _write_csv, _write_tokenizer

from contract.errors import UserError
from runtime.bundle import open_bundle
from runtime.sources import open_data, open_images, open_npz


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return _write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


GOOD = [("a good film", "pos"), ("a bad film", "neg"), ("the plot was fine", "pos"),
        ("awful and dull", "neg")] * 5


def test_labels_written_as_whole_floats_beside_integers_are_one_class_and_noted(
        tmp_path, tok):
    """`1.0` beside `1` was one class without the note the README promises (`01` beside `1`
    had it): the float was made whole before the spellings were compared."""
    rows = [(t, ("1.0" if i % 3 == 0 else "1") if lab == "pos" else "0")
            for i, (t, lab) in enumerate(GOOD)]
    src = _text(_write_csv(tmp_path / "f.csv", rows), tok)
    assert src.class_names == ["0", "1"]
    said = src.problems.summary()
    assert said and "written in different ways" in said and "1 and 1.0 as 1" in said, said
    plain = _text(_write_csv(tmp_path / "p.csv", [(t, "1.0" if lab == "pos" else "0.0")
                                                  for t, lab in GOOD]), tok)
    assert plain.problems.summary() is None  # one spelling each: nothing to say


def test_a_stray_quote_pair_that_makes_rows_one_is_noted(tmp_path, tok):
    """A quote opened on one line and closed a few lines on made those rows one record (RFC
    CSV, read without a word); lines inside a quoted field that read as rows with a known
    label are noted. A text that spans lines legitimately is not."""
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in GOOD]
    lines[3] = '"' + lines[3]
    lines[6] = lines[6].replace(",", '",', 1)
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n")
    src = _text(tmp_path / "q.csv", tok)
    assert len(src) == len(GOOD) - 3
    said = src.problems.summary()
    assert said and "a quoted field holds lines that read as whole rows" in said, said
    assert "lines 4-7" in said, said  # (the quotes' lines)
    ok = _write_csv(tmp_path / "ok.csv", GOOD + [("a film\nwith a plot\nthat was fine", "pos")])
    assert _text(ok, tok).problems.summary() is None
    # labels written 1.0 / 0.0 (the label map reads them as 1 and 0: a session 43 review)
    floats = ["text,label"] + [f"{t},{'1.0' if lab == 'pos' else '0.0'}" for t, lab in GOOD]
    floats[3], floats[6] = '"' + floats[3], floats[6].replace(",", '",', 1)
    (tmp_path / "f.csv").write_text("\n".join(floats) + "\n")
    said = _text(tmp_path / "f.csv", tok).problems.summary()
    assert said and "a quoted field holds lines that read as whole rows" in said, said


def test_rows_not_utf8_in_a_file_of_utf8_text_are_not_told_to_convert_it_all(
        tmp_path, tok):
    """Rows of Windows-1252 among UTF-8 rows beyond ASCII: the advice was to convert the whole
    file from cp1252, which garbled every other row ('café' -> 'cafÃ©'). Where the other rows
    are ASCII, converting the file is still the way."""
    body = "".join(f"{t} café,{lab}\n" for t, lab in GOOD).encode()
    (tmp_path / "m.csv").write_bytes(b"text,label\n" + body + b"the caf\xe9 film,pos\n")
    said = _text(tmp_path / "m.csv", tok).problems.summary()
    assert "mixes encodings" in said and "iconv" not in said, said
    ascii_rows = "".join(f"{t},{lab}\n" for t, lab in GOOD).encode()
    (tmp_path / "a.csv").write_bytes(b"text,label\n" + ascii_rows + b"the caf\xe9 film,pos\n")
    said = _text(tmp_path / "a.csv", tok).problems.summary()
    assert "iconv -f cp1252" in said and "mixes" not in said, said


def test_a_header_ending_in_a_comma_reads_its_rows(tmp_path, tok):
    """`text,label,` over rows `text,label`: every row was "wrong number of columns" and the
    way out named the column flags."""
    (tmp_path / "h.csv").write_text("text,label,\n" + "".join(f"{t},{lab}\n" for t, lab in GOOD)
                                    + "a fine film,pos,\n")
    src = _text(tmp_path / "h.csv", tok)
    assert len(src) == len(GOOD) + 1 and src.problems.summary() is None
    (tmp_path / "s.csv").write_text("text,label,notes\n" + "".join(
        f"{t},{lab}\n" for t, lab in GOOD))  # a named column missing stays a bad row
    with pytest.raises(UserError, match="wrong number of columns"):
        _text(tmp_path / "s.csv", tok)


def test_labels_in_another_case_than_the_given_classes_are_named(tmp_path, tok):
    """With the classes named at export, 'POS' on every other row skipped half the data with
    only "unknown label": the hint named look-alikes of classes no row held only."""
    rows = [(t, lab.upper() if i // 2 % 2 else lab) for i, (t, lab) in enumerate(GOOD)]
    src = _text(_write_csv(tmp_path / "c.csv", rows), tok,
                class_names=["neg", "pos"])
    said = src.problems.summary()
    assert "'POS' may be 'pos'" in said and "'NEG' may be 'neg'" in said, said


def test_labels_that_look_alike_are_told_apart_in_the_class_count_error(tmp_path,
                                                                        tok):
    """NFC and NFD 'café', and 'pos' with a zero-width space, were listed as if twice the same
    name; an empty class folder left out was not named."""
    rows = GOOD + [("a fine film", "caf\u00e9"), ("a dull film", "cafe\u0301"),
                   ("the film", "pos\u200b")]
    with pytest.raises(UserError) as exc:
        _text(_write_csv(tmp_path / "u.csv", rows), tok, k=4)
    msg = str(exc.value)
    assert "('cafe\\u0301', café, neg, pos, 'pos\\u200b')" in msg and "'pos\\u200b'" in msg, msg
    root = _digit_pngs(tmp_path / "digits", slice(0, 60))
    for d in root.iterdir():
        if d.name not in ("0", "1"):
            shutil.rmtree(d)
    (root / "0").rename(root / "cat")
    (root / "1").rename(root / "dog")
    (root / "emu").mkdir()
    with pytest.raises(UserError, match=r"2 distinct labels \(cat, dog; left out, holding no "
                       r"PNG/JPEG files: emu\) but the model has 3"):
        open_images(root, GREY8, IMG_INPUT, _ce(3))


def test_a_link_from_the_training_folder_into_the_held_out_one_is_noted(cnn_bundle, tmp_path):
    """A link in a class folder to the --val folder trained every held-out image under that
    class's label, without a word."""
    train = _digit_pngs(tmp_path / "train", slice(0, 100))
    val = _digit_pngs(tmp_path / "val", slice(100, 160))
    b = open_bundle(cnn_bundle)
    (train / "3" / "more").symlink_to(val)
    src = open_data(str(train), b.manifest, b.path, val=str(val))
    said = src.problems.summary()
    assert said and "read both as training images and as --val" in said, said
    assert len(src) == 160
    (train / "3" / "more").unlink()
    src = open_data(str(train), b.manifest, b.path, val=str(val))
    assert src.problems.summary() is None and len(src) == 100


def test_an_npz_whose_input_array_is_named_in_another_case_says_to_rename_it(tmp_path):
    """An array `X` beside `y`: the error listed it but gave no way out."""
    np.savez(tmp_path / "X.npz", X=np.zeros((4, 4, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(UserError, match=r"it has: X, y; save 'X' under the name 'x'"):
        open_npz(tmp_path / "X.npz", X_IN, _ce(3))


def test_the_data_line_escapes_control_characters(cnn_bundle, tmp_path, capsys):
    """A newline in the data folder's path split the `data:` line in two, and an escape code in
    a class folder's name reached the terminal (warnings and errors escaped them already)."""
    from runtime.data import load_data

    root = _digit_pngs(tmp_path / "a\nb", slice(0, 60))
    (root / "3").rename(root / "3\x1b[7m")
    load_data(str(root), open_bundle(cnn_bundle))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("data: ")]
    assert len(lines) == 1 and "a\\nb: 60 rows, 10 classes" in lines[0], out
    assert "3\\x1b[7m" in lines[0] and "\x1b" not in out, out
