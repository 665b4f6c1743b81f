"""`shardgen bench --gpu --quick`: the GPU benchmark's code path, on tiny models of the SD 1.5 and
SDXL architectures, on whatever device the suite has. Figures are not asserted (this machine is
shared and noisy); that every system ran and the JSON has its shape is."""

from __future__ import annotations

import json
import math

from pipeline.cli import main


def test_bench_gpu_quick_runs_every_system_and_writes_its_json(tmp_path, ray_local, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--gpu", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["peak_tflops"] > 0
    assert [w["arch"] for w in report["workloads"]] == ["sd15", "sdxl"]
    by_arch: dict[str, list[dict]] = {}
    for m in report["results"]:
        by_arch.setdefault(m["arch"], []).append(m)
    for arch, results in by_arch.items():
        systems = [m["system"] for m in results]
        assert systems[0] == "plain diffusers loop" and "shardgen (defaults)" in systems, systems
        ran = [m for m in results if m["images_per_s"]]
        skipped = [m for m in results if not m["images_per_s"]]
        # The plain loop and the shardgen job ran; what was not run says why: compiling is skipped
        # in --quick, and the U-Net architectures refuse the choices for DiT denoisers, naming them.
        assert [m["system"] for m in ran] == ["plain diffusers loop", "shardgen (defaults)"], arch
        assert all(m["note"] for m in skipped)
        notes = {m["system"]: m["note"] for m in skipped}
        assert notes["shardgen, attention_backend: _native_cudnn"].startswith("refused: attention_backend: ")
        assert notes["shardgen, cache: first_block 0.05"].startswith("refused: cache: ")
        assert notes["shardgen, compile: regional"] == "skipped in --quick"
        assert ran[1]["note"] == "batch 8, fill 100%"  # auto on a CPU: 8, one row a call (batch-invariant)
        plain, shardgen = ran
        assert plain["ratio_to_plain"] == 1.0 and shardgen["ratio_to_plain"] > 0
        assert shardgen["images"] == plain["images"] == 12
        assert 0 < shardgen["mfu"] and 0 < shardgen["first_image_s"] <= shardgen["wall_s"]
        # shardgen's images are the plain loop's for the same seeds (CPU: to the last bit or nearly).
        assert shardgen["min_psnr_db"] == math.inf or shardgen["min_psnr_db"] > 40
    printed = capsys.readouterr().out
    assert "shardgen (defaults)" in printed and "TFLOP/s" in printed
    assert "| sd15 | shardgen (defaults) |" in printed  # the markdown table docs/performance.md holds
