"""Benchmark: X-adapter pre-training throughput and retrieval (issue 7).

Measured in one process, on the same inputs:
  mlm        V-expert MLM pre-training steps (sequences/s): CLIP text tower on the PLM's view of each sentence,
             top-k retrieval from the image index, BERT forward with the adapter between the last two layers, the
             MLM head on the masked positions, backward into the adapter only, AdamW step. bf16 autocast on CUDA.
  reference  the frozen forward of BERT + the CLIP text tower alone (no adapter, no retrieval, no grad) on the
             same batches: the ceiling the adapter step is compared with (target: mlm >= 70 % of reference).
  retrieval  top-k search of the image index (queries/s), index of ``--index-size`` (118,287 = COCO train2017)
             L2-normalised embeddings stored in fp16 on the device, queries in batches of ``--batch``.

Models are random-init (BERT-base config, CLIP ViT-B/16 via open_clip; nothing is downloaded): the cost does not
depend on the weights. Text batches are random token ids with BERT masking at ``--mask-ratio`` (the loader's work,
tokenization and the CLIP view, runs in DataLoader workers in real runs and is not timed here).

    python bench/xadapter.py                       # full sizes on cuda if available (batch 256, length 64)
    python bench/xadapter.py --smoke               # tiny models on CPU, seconds
    python bench/xadapter.py --out bench.json      # also write the results as JSON

``main(argv)`` returns the results dict (also printed as a table).
"""

from __future__ import annotations

# bench/gpu_all.py runs this (see its header for the convention); budget = expected seconds on one H200
GPU_COMMAND = ["--out", "{out}/bench.json"]
GPU_BUDGET_S = 150

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from xmx.backbones.clip import CLIPBackbone
from xmx.backbones.plm import PLM, build_plm
from xmx.data.mlm import MLMMasker
from xmx.features.retrieval import ImageIndex
from xmx.methods.xadapter import XAdapter, mlm_head

TARGET_RATIO = 0.70  # mlm sequences/s >= 70 % of the frozen BERT + CLIP text forward


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU (seconds)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--index-size", type=int, default=None)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.45)
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    d = dict(batch=8, seq_len=16, index_size=2000, steps=3, warmup=1) if a.smoke else \
        dict(batch=256, seq_len=64, index_size=118_287, steps=20, warmup=5)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def build_models(smoke: bool, device: torch.device) -> tuple[CLIPBackbone, PLM]:
    if smoke:
        clip, plm = CLIPBackbone("xmx-tiny", None), build_plm("tiny")
    else:
        from transformers import BertConfig, BertForMaskedLM
        tiny = build_plm("tiny")  # only for a tokenizer object; the model is BERT-base (random init)
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig())  # bert-base-uncased's config: 12 x 768, vocab 30522
        plm = PLM(model, tiny.tokenizer, "bert", "bert-base (random init)", "random-init", True)
        clip = CLIPBackbone("ViT-B-16", None)
    return clip.to(device), plm.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def make_batches(plm: PLM, clip: CLIPBackbone, args, n: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    vocab = plm.model.config.vocab_size
    masker = MLMMasker(plm.tokenizer, args.mask_ratio, seed=0)
    masker.special = torch.tensor([0, 101, 102, 103], dtype=torch.long)  # BERT-base's [PAD] [CLS] [SEP] [MASK]
    masker.mask_id = 103 if vocab > 103 else masker.mask_id
    masker.candidates = torch.arange(104, vocab) if vocab > 104 else masker.candidates
    out = []
    for _ in range(n):
        ids = torch.randint(1000 if vocab > 2000 else 10, vocab, (args.batch, args.seq_len), generator=g)
        ids[:, 0], ids[:, -1] = (101, 102) if vocab > 103 else (2, 3)
        am = torch.ones_like(ids)
        ids, labels = masker(ids, am)
        clip_tokens = torch.randint(1, 49406, (args.batch, clip.context_length), generator=g)
        clip_tokens[:, 20:] = 0
        clip_tokens[:, 19] = 49407  # end of text
        out.append({k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=am, labels=labels,
                                                      clip_tokens=clip_tokens).items()})
    return out


def bench_mlm(clip, plm, index, batches, args, device) -> dict:
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    heads = 12 if plm.hidden_size % 12 == 0 else 4
    adapter = XAdapter(plm.hidden_size, plm.num_layers, clip.embed_dim, heads=heads).to(device)  # not attached yet
    adapter.train()
    opt = torch.optim.AdamW([p for p in adapter.parameters()], lr=1e-4)
    head = mlm_head(plm)
    it = iter(range(10**9))

    def step():
        b = batches[next(it) % len(batches)]
        with amp:
            with torch.no_grad():
                q = clip.encode_text(b["clip_tokens"])
                _, rows = index.search(q, args.k)
                feats = index.features(rows)
            with adapter.context(feats, None):
                hidden = plm.model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            sel = b["labels"] != -100
            loss = F.cross_entropy(head(hidden[sel]).float(), b["labels"][sel])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reference():
        b = batches[next(it) % len(batches)]
        with amp, torch.no_grad():
            clip.encode_text(b["clip_tokens"])
            plm.model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    t_ref = _time(reference, args.steps, args.warmup, device)  # the PLM without hooks
    adapter.attach(plm.layers)
    try:
        t_mlm = _time(step, args.steps, args.warmup, device)
    finally:
        adapter.detach()
    t_ref += _time(reference, args.steps, 0, device)  # again after: both orders, against drift / warm caches
    ref, mlm = statistics.median(t_ref), statistics.median(t_mlm)
    return {"mlm_seq_per_s": args.batch / mlm, "reference_seq_per_s": args.batch / ref,
            "ratio": ref / mlm, "target_ratio": TARGET_RATIO, "meets_target": ref / mlm >= TARGET_RATIO,
            "mlm_step_ms": 1000 * mlm, "reference_step_ms": 1000 * ref,
            "adapter_params": sum(p.numel() for p in adapter.parameters())}


def bench_retrieval(index: ImageIndex, dim: int, args, device) -> dict:
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(args.batch, dim, generator=g).to(device) for _ in range(4)]
    it = iter(range(10**9))
    times = _time(lambda: index.search(qs[next(it) % 4], args.k), args.steps, args.warmup, device)
    t = statistics.median(times)
    return {"queries_per_s": args.batch / t, "batch_ms": 1000 * t, "index_size": len(index),
            "index_dtype": str(index.embeddings.dtype).replace("torch.", ""), "k": args.k}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    threads = torch.get_num_threads()
    n_threads = args.threads or (1 if args.smoke else threads)  # smoke: tiny tensors, threads only add contention
    torch.set_num_threads(n_threads)
    try:
        clip, plm = build_models(args.smoke, device)
        g = torch.Generator().manual_seed(2)
        emb = torch.randn(args.index_size, clip.embed_dim, generator=g)
        index = ImageIndex(emb, list(range(args.index_size)),
                           dtype=torch.float16 if device.type == "cuda" else torch.float32).to(device)
        batches = make_batches(plm, clip, args, 4, device)
        mlm = bench_mlm(clip, plm, index, batches, args, device)
        retrieval = bench_retrieval(index, clip.embed_dim, args, device)
    finally:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {n_threads} threads)"
    results = {"benchmark": "xadapter", "smoke": args.smoke, "device": device.type, "device_name": name,
               "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "sizes": {"batch": args.batch, "seq_len": args.seq_len, "index_size": args.index_size, "k": args.k,
                         "mask_ratio": args.mask_ratio, "plm": plm.name, "clip": clip.arch,
                         "autocast": "bf16" if device.type == "cuda" else "fp32"},
               "mlm": mlm, "retrieval": retrieval}
    print(f"X-adapter benchmark on {name} (batch {args.batch}, length {args.seq_len}, {plm.name} + {clip.arch})\n"
          f"  V-expert MLM step   {mlm['mlm_seq_per_s']:10.1f} seq/s  ({mlm['mlm_step_ms']:.1f} ms)\n"
          f"  frozen BERT + CLIP  {mlm['reference_seq_per_s']:10.1f} seq/s  ({mlm['reference_step_ms']:.1f} ms)\n"
          f"  ratio               {mlm['ratio']:10.2f}        (target >= {TARGET_RATIO:.2f}: "
          f"{'met' if mlm['meets_target'] else 'NOT met'})\n"
          f"  retrieval           {retrieval['queries_per_s']:10.1f} queries/s over {len(index)} images "
          f"(top-{args.k})")
    text = json.dumps(results, indent=1)
    if args.json:
        print(text)
    if args.out:
        from xmx.utils import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
