"""python classify_image.py MODEL IMAGE ...  (MODEL.onnx/.preprocess.json[/.labels.json]: export-model)"""
import json
import os
import sys

import numpy as np
from PIL import Image

# EXIF orientation -> the turn that shows the image upright
TURNS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
         6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def load(path, prep):
    """One image file as the model's input, the steps training took (MODEL.preprocess.json)."""
    size, c = (prep["width"], prep["height"]), prep["channels"]
    im = Image.open(path)
    if im.format == "JPEG" and "jpeg_draft" in prep:  # decoded at a reduced scale, as in training
        im.draft(im.mode, tuple(prep["jpeg_draft"]))
    # turned upright by its EXIF orientation after the resize (to the size the turn makes the
    # input's), as training does: turning first then resizing rounds some pixels 1/255 apart
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: taken as upright, as training does
        orientation = 1
    if orientation in (5, 6, 7, 8):
        size = size[::-1]

    def upright(img):
        img = img.resize(size, Image.BILINEAR)
        turn = TURNS.get(orientation)
        return img.transpose(getattr(Image.Transpose, turn)) if turn else img

    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grey: scaled, then resized
        a = np.asarray(im, np.float32) * (1.0 if im.mode == "F" else 1 / 65535)
        x = np.repeat(np.asarray(upright(Image.fromarray(a, "F")))[None], c, 0)
    else:
        x = np.asarray(upright(im.convert(prep["mode"])), np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.array(prep["mean"], np.float32)[:, None, None]
    std = np.array(prep["std"], np.float32)[:, None, None]
    x = (x - mean) / std  # [channels, height, width]
    x = x[None] if prep["layout"] == "NCHW" else x[:1]  # NHW: a grey model without channel axis
    return x.astype(prep["dtype"])


if __name__ == "__main__":
    import onnxruntime as ort

    model, files = sys.argv[1], sys.argv[2:]
    prep = json.load(open(f"{model}.preprocess.json"))  # what training did to each image file
    labels = (json.load(open(f"{model}.labels.json"))
              if os.path.exists(f"{model}.labels.json") else None)
    sess = ort.InferenceSession(f"{model}.onnx")
    for f in files:
        k = int(sess.run(None, {prep["input"]: load(f, prep)})[0][0].argmax())
        print(f"{labels[k] if labels else k:>10}  {f}")
