"""python classify.py MODEL "a sentence" ...  (MODEL.onnx/.labels.json/.tokenizer.json: export-model)"""
import json
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

if len(sys.argv) < 3:
    sys.exit(__doc__)
model, texts = sys.argv[1], sys.argv[2:]
tok = Tokenizer.from_file(f"{model}.tokenizer.json")  # pads and truncates as in training
labels, sess = json.load(open(f"{model}.labels.json")), ort.InferenceSession(f"{model}.onnx")
enc = tok.encode_batch(texts)
ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])
for text, logits in zip(texts, sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], strict=True):
    print(f"{labels[logits.argmax()]:>7}  {text}")
