"""The main job: a short training run with asymmetric checkpointing, a restore, a summary.

``python -m asymstore.demo [--steps N] [--dir PATH] [--strategy asym]`` trains a small GPT-2
(built from a transformers config, no downloads) on synthetic tokens, checkpointing every
step into the default tiers (host memory + a local directory), then restores the newest
checkpoint into a fresh model, checks it bit for bit and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import asymstore
from asymstore.trainer_hooks import AsymCheckpointer


VOCAB = 4096


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=VOCAB,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a fresh temporary one)")
    ap.add_argument("--strategy", default="asym", choices=["sync", "checkfreq", "uniform", "asym"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--trace", default=None, help="write the timeline as a Chrome/Perfetto trace JSON")
    args = ap.parse_args(argv)
    con = Console()
    ckpt_dir = args.dir or tempfile.mkdtemp(prefix="asymstore-demo-")
    torch.set_num_threads(max(os.cpu_count() or 1, 1))

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    store = asymstore.open_store(ckpt_dir, host_slots=2)
    pos = {"batch": 0}  # the data position: batches consumed, read right after each optimizer step
    n_params = sum(p.numel() for p in model.parameters())
    con.print(f"[bold]asymstore demo[/]: GPT-2 with {n_params / 1e6:.1f}M parameters, {args.steps} steps, "
              f"strategy [cyan]{args.strategy}[/], checkpoint every step into host memory + {ckpt_dir}")
    t0 = time.perf_counter()
    ck = AsymCheckpointer(model, opt, store, every=1, scheduler=sched, strategy=args.strategy, warmup=2,
                          extras=lambda: dict(pos), trace=bool(args.trace))
    losses = []
    with ck:
        for _ in range(args.steps):
            gen = torch.Generator().manual_seed(1234 + pos["batch"])  # batch k is a function of k
            x = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            pos["batch"] += 1
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    train_s = time.perf_counter() - t0
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # restore into a fresh model and optimizer, as a restarted job would
    model2 = build_model(seed=99)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-4)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 4))
    store2 = asymstore.open_store(ckpt_dir)
    ck2 = AsymCheckpointer(model2, opt2, store2, scheduler=sched2)
    t1 = time.perf_counter()
    extras = ck2.resume()
    restore_s = time.perf_counter() - t1
    exact = all(torch.equal(final[k], v) for k, v in model2.state_dict().items())
    rep = store2.last_restore
    verify = store2.tiers[0].reader(ck2.step).verify()

    s = ck.summary()
    tab = Table(title="asymstore demo summary", show_header=False)
    tab.add_row("iterations", str(args.steps))
    tab.add_row("training time", f"{train_s:.1f} s ({train_s / args.steps:.2f} s/iter)")
    tab.add_row("loss first -> last", f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    tab.add_row("checkpoints committed", str(len(store2.steps())) + f" (steps {store2.steps()[0]}..{store2.steps()[-1]})")
    tab.add_row("checkpoint size", f"{s['bytes_per_checkpoint'] / 2**20:.1f} MiB")
    tab.add_row("median stall per checkpoint", f"{s['median_stall_s'] * 1000:.1f} ms")
    tab.add_row("bytes copied inside fwd/bwd", f"{s['hidden_fraction'] * 100:.0f}%")
    stored = [h for h in ck.history if h.stored_bytes]
    if stored:
        ratio = stored[-1].stored_bytes / max(stored[-1].bytes, 1)
        tab.add_row("stored/raw (last)", f"{ratio:.3f}  codecs {stored[-1].codecs}")
    tab.add_row("memory reserved", ", ".join(f"{k}={v / 2**20:.0f} MiB" for k, v in store.memory_report().items()))
    tab.add_row("restored", f"step {rep.step if rep else '?'} from tier '{rep.tier if rep else '?'}' in "
                            f"{restore_s * 1000:.0f} ms, data position {extras}")
    tab.add_row("verify", "ok" if verify.ok else f"FAILED {verify.problems}")
    tab.add_row("restored == trained", "[green]bit-identical[/]" if exact else "[red]MISMATCH[/]")
    con.print(tab)
    if args.trace:
        con.print(f"timeline written to {ck.write_trace(args.trace)}")
    store.close()
    store2.close()
    return 0 if exact and verify.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
