"""torchrun --nproc_per_node 2 tests/fsdp2_generate.py SYNCED: harness.generate on a model sharded with torch's own
fully_shard (FSDP2, gloo on CPU), the two ranks stopping after different numbers of tokens. With SYNCED=1 every rank
runs the same number of forwards and prints `rank R EQUAL` when its output equals the unsharded model's; with 0 the
rank that stops first leaves the others inside a collective (the hang or crash that synced generation prevents)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
import salt_grpo as sg  # noqa: E402

dist.init_process_group("gloo")
rank, synced = dist.get_rank(), sys.argv[1] == "1"
model, tok = harness.tiny_llama(seed=0)
ref, _ = harness.tiny_llama(seed=0)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
cfg = sg.demo_config(bf16=False)
prompts = ["What is 1 + 2?\n"] if rank == 0 else ["Hi\n", "A longer prompt\n"]
new = 12 if rank == 0 else 3
out = []
for m, kw in ((model, dict(synced=synced)), (ref, {})):
    gens = [torch.Generator().manual_seed(10 * rank + i) for i in range(len(prompts))]
    out.append(harness.generate(m, tok, prompts, cfg, torch.device("cpu"), new, generators=gens, **kw)[2])
print(f"rank {rank} {'EQUAL' if torch.equal(out[0], out[1]) else 'DIFFERENT'}", flush=True)
dist.barrier()
dist.destroy_process_group()
