"""python classify_image.py MODEL IMAGE ...  (MODEL.onnx/.preprocess.json[/.labels.json]: export-model)"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps


def load(path, prep):
    """One image file as the model's input, the steps training took (MODEL.preprocess.json)."""
    size, c = (prep["width"], prep["height"]), prep["channels"]
    im = Image.open(path)
    if im.format == "JPEG" and "jpeg_draft" in prep:  # decoded at a reduced scale, as in training
        im.draft(im.mode, tuple(prep["jpeg_draft"]))
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grey: scaled, then resized
        a = np.asarray(im, np.float32) * (1.0 if im.mode == "F" else 1 / 65535)
        x = np.repeat(np.asarray(Image.fromarray(a, "F").resize(size, Image.BILINEAR))[None], c, 0)
    else:
        x = np.asarray(im.convert(prep["mode"]).resize(size, Image.BILINEAR), np.float32) / 255.0
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
