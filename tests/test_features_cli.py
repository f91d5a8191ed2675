"""``python -m xmx.features``: builds a config's features into the store, lists, verifies and prunes them."""

from __future__ import annotations

from datetime import datetime, timedelta

from xmx.features.__main__ import main


def test_build_then_list_verify_prune(xmx_cache, tmp_path, capsys):
    store = tmp_path / "store"
    common = [f"paths.cache_dir={xmx_cache}", f"features.root={store}"]
    assert main(["method=linear_probe", "shots=2", *common]) == 0
    out = capsys.readouterr().out
    assert "features ready for synthetic: train (1, 20, 32)" in out and "test (200, 32)" in out
    assert main(["list", "--root", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "synthetic/train" in listing and "synthetic/test" in listing
    n = int(listing.strip().splitlines()[-1].split()[0])
    assert n >= 3  # train, val, test features
    # corrupt one entry: verify reports it (exit 1) and --remove deletes it
    victim = sorted(store.rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    assert main(["verify", "--root", str(store)]) == 1
    assert main(["verify", "--root", str(store), "--remove"]) == 0
    capsys.readouterr()
    assert main(["prune", "--root", str(store), "--before", (datetime.now() + timedelta(days=1)).isoformat()]) == 0
    assert "removed" in capsys.readouterr().out
    assert not list(store.rglob("*.safetensors"))


def test_bad_input_is_one_line(capsys, tmp_path):
    assert main(["prune", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: prune needs --before")
