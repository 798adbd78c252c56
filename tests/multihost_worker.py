"""One process of test_sharding's multi-process run: joins the others through
`codellama_jax.distributed.initialize` (CODELLAMA_* variables), loads the checkpoint onto a
(2, 4) mesh spanning both processes, and writes its logits and greedy tokens as JSON."""

import json
import sys

import numpy as np

from codellama_jax import distributed

distributed.initialize()

import jax  # noqa: E402

from codellama_jax import generate, load, sharding  # noqa: E402

path, out, prompts, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = load(path, mesh=sharding.make_mesh((2, 4)))
logits = np.nan_to_num(model.logits(prompts), nan=0.0)
greedy = [c.token_ids for c in generate(model, prompts, temperature=0.0, max_tokens=new_tokens)]
with open(out, "w") as f:
    json.dump({"devices": [jax.device_count(), jax.local_device_count()], "logits": logits.tolist(), "greedy": greedy}, f)
