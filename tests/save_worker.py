"""Saves one adapter into a folder over and over: until killed (tests/test_atomic_save.py kills it mid-save), or
COUNT times when a count is given (concurrent savers).

Save i writes every cuma_B filled with the value i, so a reader can tell whether one save's tensors are mixed
with another's.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the tree under test, not an installed copy

import cuma_model  # noqa: E402
from tiny_models import tiny_decoder  # noqa: E402

count = int(sys.argv[2]) if len(sys.argv) > 2 else None
model = tiny_decoder("llama")
cuma_model.patch_model(model, num_experts=4, top_k=2, r=4, demographic_dim=5)
i = 0
while count is None or i < count:
    i += 1
    with torch.no_grad():
        for layer in cuma_model.cuma_layers(model).values():
            layer.cuma_B.fill_(float(i))
    cuma_model.save_pretrained(model, sys.argv[1])
    if i == 1:  # the folder exists from here on
        print("saving", flush=True)
