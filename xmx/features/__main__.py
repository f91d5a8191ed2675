"""``python -m xmx.features``: build the features a config needs, or look after the store.

    python -m xmx.features experiment=tip_adapter_f_16shot data=oxford_pets   # any xmx.run overrides
    python -m xmx.features list [--root DIR]
    python -m xmx.features verify [--root DIR] [--remove]
    python -m xmx.features prune --before 2026-10-01 [--root DIR]
    python -m xmx.features --help

Building composes the same config as ``xmx.run`` and sets up its datamodule, which reads every split through the
store (a progress bar and a throughput line per extraction; "hit" when the entry was already there).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from xmx.errors import XmxError

HOUSEKEEPING = ("list", "verify", "prune")


def _default_root() -> Path:
    from xmx.config import compose
    cfg = compose()
    return Path(str(cfg.features.root)).expanduser()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one ``error:`` line (exit 2) instead of usage + message
        raise XmxError(f"{message} (python -m xmx.features --help)")


def _backbone(key: dict) -> str:
    """``tiny random-init`` / ``clip_rn50 3f2a9c1e``: which encoder an entry's features come from."""
    b = key.get("backbone")
    if not isinstance(b, dict):
        return str(b or "-")
    name = b.get("name") or b.get("arch") or "?"
    return f"{name} random-init" if b.get("random_init") else f"{name} {str(b.get('sha256') or '')[:8]}".rstrip()


def housekeeping(argv: list[str]) -> int:
    from xmx.features.store import FeatureStore
    p = _Parser(prog="python -m xmx.features", description="Feature store housekeeping")
    p.add_argument("command", choices=HOUSEKEEPING)
    p.add_argument("--root", help="store root (default: the config's features.root)")
    p.add_argument("--remove", action="store_true", help="verify: delete entries that fail")
    p.add_argument("--before", help="prune: remove entries not used since this ISO date")
    a = p.parse_args(argv)
    root = Path(a.root).expanduser() if a.root else _default_root()
    store = FeatureStore(root)
    if a.command == "list":
        entries = store.entries()
        for e in sorted(entries, key=lambda e: e.last_used):
            k = e.key
            what = "/".join(str(k.get(f)) for f in ("dataset", "split") if k.get(f)) or k.get("kind", "")
            print(f"{e.kind:16s} {e.size / 2**20:9.1f} MiB  created {e.created:%Y-%m-%d %H:%M}  "
                  f"used {e.last_used:%Y-%m-%d %H:%M}  {_backbone(k):24s}  {what}  {e.path.name[:16]}")
        print(f"{len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MiB under {root}")
        return 0
    if a.command == "verify":
        bad = store.verify_all(remove=a.remove)
        print(f"{len(store.entries())} entries verified under {root}; {len(bad)} bad"
              + (" (removed)" if a.remove and bad else ""))
        return 1 if bad and not a.remove else 0
    if not a.before:
        raise XmxError("prune needs --before DATE (ISO, e.g. 2026-10-01): entries not used since then are removed")
    removed = store.prune(datetime.fromisoformat(a.before))
    print(f"removed {len(removed)} entries not used since {a.before} from {root}")
    return 0


def build(overrides: list[str]) -> int:
    from omegaconf import open_dict

    from xmx.config import build as instantiate, compose
    from xmx.preflight import preflight
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise XmxError(f"{bad[0]!r} is neither a command ({', '.join(HOUSEKEEPING)}) nor a KEY=VALUE override "
                       "(python -m xmx.features --help)")
    cfg = compose(overrides)
    if cfg.method.get("inputs") != "features":
        raise XmxError(f"method {cfg.method.get('name')} reads images, not cached features: nothing to build")
    with open_dict(cfg):
        cfg.paths.output_dir = None
    preflight(cfg)  # the same checks, in the same order, as xmx.run
    backbone = instantiate(cfg.backbone)
    dm = instantiate(cfg.data, backbone=backbone, _convert_="all")
    dm.setup("fit")
    print(f"features ready for {dm.name}: train {tuple(dm.train_features.shape)}, "
          + ", ".join(f"{s.name} {tuple(dm.features_of(s).shape)}" for s in [dm.val_set, *dm.eval_sets])
          + f" under {cfg.features.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(__doc__.strip())
        return 0
    try:
        return housekeeping(argv) if argv and argv[0] in HOUSEKEEPING else build(argv)
    except XmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
