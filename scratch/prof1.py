import sys, time, torch
sys.path.insert(0, "src")
from torch.profiler import ProfilerActivity, profile
from opdlens.models import random_policy
from opdlens.rollout import TorchEngine
dev = torch.device("cuda")
pol = random_policy("qwen3-0.6b", seed=0, device=dev, dtype=torch.bfloat16)
m = pol.model
ids = torch.randint(0, pol.vocab_size, (256, 64), device=dev)
def sync(): torch.cuda.synchronize()
with torch.inference_mode():
    for i in range(3):
        sync(); t=time.perf_counter(); r = m.model(input_ids=ids, use_cache=True); sync(); print("hf prefill fwd ms", (time.perf_counter()-t)*1e3, flush=True)
    for i in range(2):
        sync(); t=time.perf_counter(); r = m.model(input_ids=ids, use_cache=False); sync(); print("hf prefill fwd nocache ms", (time.perf_counter()-t)*1e3, flush=True)
    print(type(m.model.layers[0].self_attn), m.config._attn_implementation)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        r = m.model(input_ids=ids, use_cache=True); sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
    eng = TorchEngine(m, [], pol.pad_token_id, dev, max_batch_rows=512, cuda_graphs=False)
    prompts = ids.tolist()
    eng.sample(prompts, 1, 128, seed=0); sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.sample(prompts, 1, 128, seed=1); sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    tp = [[int(x) for x in torch.randint(0, pol.vocab_size, (2048,))] for _ in range(4)]
    eng.sample(tp, 64, 32, seed=0); sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.sample(tp, 64, 32, seed=1); sync()
    print("4 targets 2K N=64, 32 tokens")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)
