"""Writes python_written.safetensors with the Python safetensors library (the serializer
`safetensors.torch.save_file` shares), so the Rust reader is tested against files it did
not write. Values follow closed formulas that tests/python_case.rs recomputes.

    python3 -m pip install safetensors numpy && python3 make_python_case.py
"""
import numpy as np
from safetensors.numpy import save_file

B, HQ, HKV, L, S, E, EV = 2, 4, 2, 5, 7, 8, 3


def formula(shape, salt):
    idx = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    return np.sin(idx * 0.37 + salt)


q = formula((B, HQ, L, E), 0.0)
k = formula((B, HKV, S, E), 1.0)
v = formula((B, HKV, S, EV), 2.0)
mask = (np.arange(L * S).reshape(1, 1, L, S) % 3) != 0
save_file(
    {"q": q, "k": k, "v": v, "attn_mask": mask, "q16": q.astype(np.float16)},
    "python_written.safetensors",
    metadata={
        "is_causal": "False",
        "causal": "bottom_right",
        "dropout_p": "0.25",
        "seed": "1234",
        "offset": "8",
        "scale": "-0.3",
        "enable_gqa": "True",
        "name": "python_written",
    },
)
