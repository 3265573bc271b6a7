"""python classify_image.py MODEL IMAGE ...  (MODEL.onnx/.labels.json/.preprocess.json: export-model)"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

model, files = sys.argv[1], sys.argv[2:]
prep = json.load(open(f"{model}.preprocess.json"))  # what training did to each image file
labels, sess = json.load(open(f"{model}.labels.json")), ort.InferenceSession(f"{model}.onnx")
mean = np.array(prep["mean"], np.float32)[:, None, None]
std = np.array(prep["std"], np.float32)[:, None, None]
for f in files:
    im = ImageOps.exif_transpose(Image.open(f)).convert(prep["mode"])
    im = im.resize((prep["width"], prep["height"]), Image.BILINEAR)
    x = np.asarray(im, np.float32) / 255.0
    x = (x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - mean
    x = (x / std)[None] if prep["layout"] == "NCHW" else (x / std)[:1]
    logits = sess.run(None, {prep["input"]: x.astype(prep["dtype"])})[0][0]
    print(f"{labels[logits.argmax()]:>10}  {f}")
