"""A hub id analysed while it downloads vs downloaded first and analysed after, in one run.

A local stand-in for the Hub (tests/hubstub.py, on 127.0.0.1, in its own process as the real
hub is on its own machine) serves a synthetic sharded checkpoint, throttled so that downloading
it takes about as long as analysing it (the analysis of the local copy is timed first, and the
rate set to size / that time). Then, each with an empty HF cache:

- download-then-analyse: ``snapshot_download`` of the whole repo, then ``analyze`` of the
  snapshot folder (what esdtool did before, and what any tool that needs local files does);
- overlapped: ``analyze("org/name")``, the default road for a hub id (shards downloaded into
  the cache on a background thread in reading order while the analysis runs);
- streamed: ``analyze("org/name", stream=True)`` (range requests, nothing stored), for reference.

The ratio overlapped / download-then-analyse approaches max(D, C) / (D + C) = 0.5 with many
shards; the first shard is never overlapped. Target: <= 0.65.

``--processes`` times whole processes instead, as a user meets them (start-up and imports
included), for 12 matrices in 1, 3 and 12 shards, with the link throttled so that the download
takes about 1.5x the local analysis (download-bound) or 0.4x (compute-bound): the download alone
(``snapshot_download`` in a fresh interpreter), ``esdtool analyze DIR`` of the local copy, and
``esdtool analyze org/name`` (empty cache). Target: the hub run's wall <= max(download, local)
+ 0.5 x min(download, local), i.e. a ratio <= 1.

    python benchmarks/bench_hub_overlap.py [--shards 16] [--size 768] [--repeat 2]
    python benchmarks/bench_hub_overlap.py --processes [--size 768] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core computes, the other moves bytes

REPO = "bench-org/sharded"
STUB = Path(__file__).resolve().parents[1] / "tests" / "hubstub.py"


@contextlib.contextmanager
def hub_process(root: Path, rate: float) -> Iterator[str]:
    """The stand-in serving ``root`` at ``rate`` bytes/s from its own process: its endpoint."""
    args = [sys.executable, str(STUB), str(root), "--rate", str(rate)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def served_bytes(endpoint: str) -> int:
    with urllib.request.urlopen(f"{endpoint}/_stub/served") as response:
        counts = json.load(response)
    return sum(n for name, n in counts.items() if name.endswith(".safetensors"))


def write_checkpoint(directory: Path, shards: int, size: int) -> int:
    """``shards`` shards of 3 float32 matrices each (size x 2 size: compute and bytes in about
    the same proportion per shard), with an index; the bytes written."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{s}.mlp.{kind}_proj.weight": torch.randn(size, 2 * size, generator=gen)
            for kind in ("gate", "up", "down")
        }
        save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 4 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return total


def point_hub_at(endpoint: str, cache: Path) -> None:
    """huggingface_hub reads HF_ENDPOINT and HF_HOME at import: set its constants too."""
    from huggingface_hub import constants

    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_CACHE = str(cache)
    constants.HF_HUB_OFFLINE = False


def write_split(directory: Path, matrices: int, shards: int, size: int) -> int:
    """``matrices`` float32 matrices (size x 2 size) spread over ``shards`` shards, with an
    index; the bytes written."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    per = -(-matrices // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        rows = range(s * per, min(matrices, (s + 1) * per))
        tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(size, 2 * size,
                                                                       generator=gen)
                   for i in rows}  # fmt: skip
        save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += (directory / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return total


def timed_process(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one fresh interpreter running ``args``."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, **env},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    return time.perf_counter() - started


def processes(size: int, repeat: int) -> None:
    """The --processes table (see the module docstring), the best of ``repeat`` runs of each
    road, interleaved (a busy machine slows one run, not one road)."""
    print("| shards | bound | MB | download s | local s | hub s | target s | hub / target |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shards in (1, 3, 12):
            model = work / f"model-{shards}"
            nbytes = write_split(model, 12, shards, size)
            repos = work / f"repos-{shards}"
            shutil.copytree(model, repos / REPO)
            analyse = ["-m", "esdtool", "analyze"]
            timed_process([*analyse, str(model), "-o", str(work / "warm.parquet"), "--quiet"], {})
            local = min(timed_process([*analyse, str(model), "-o", str(work / "l.parquet"),
                                       "--quiet"], {}) for _ in range(repeat))  # fmt: skip
            for bound, factor in (("download", 1.5), ("compute", 0.4)):
                rate = nbytes / (factor * local)
                fetch = f"from huggingface_hub import snapshot_download as s; s({REPO!r})"
                download = hub = float("inf")
                with hub_process(repos, rate) as endpoint:
                    for n in range(repeat):  # each with an empty cache
                        homes = [str(work / f"home-{shards}-{bound}-{n}-{tag}") for tag in "dh"]
                        download = min(
                            download,
                            timed_process(
                                ["-c", fetch], {"HF_ENDPOINT": endpoint, "HF_HOME": homes[0]}
                            ),
                        )
                        hub = min(
                            hub,
                            timed_process(
                                [*analyse, REPO, "-o", str(work / "h.parquet"), "--quiet"],
                                {"HF_ENDPOINT": endpoint, "HF_HOME": homes[1]},
                            ),
                        )
                target = max(download, local) + 0.5 * min(download, local)
                print(
                    f"| {shards} | {bound} | {nbytes / 1e6:.0f} | {download:.2f} | "
                    f"{local:.2f} | {hub:.2f} | {target:.2f} | {hub / target:.2f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--size", type=int, default=768, help="rows of each matrix")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each road (best kept)")
    parser.add_argument("--processes", action="store_true", help="whole processes; see above")
    args = parser.parse_args()
    if args.processes:
        processes(args.size, args.repeat)
        return

    import torch
    from huggingface_hub import snapshot_download

    from esdtool import analyze

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "model"
        model.mkdir()
        nbytes = write_checkpoint(model, args.shards, args.size)
        analyze(model, work / "warm.parquet")  # imports, first-call costs
        started = time.perf_counter()
        analyze(model, work / "local.parquet")
        compute = time.perf_counter() - started
        rate = nbytes / compute

        shutil.copytree(model, work / "repos" / REPO)
        times: dict[str, list[float]] = {"download": [], "sequential": [], "overlapped": [],
                                          "streamed": []}  # fmt: skip
        with hub_process(work / "repos", rate) as endpoint:
            for n in range(args.repeat):  # interleaved, the best of each: a busy machine
                point_hub_at(endpoint, work / f"cache-a{n}")
                started = time.perf_counter()
                snapshot = snapshot_download(REPO)
                times["download"].append(time.perf_counter() - started)
                analyze(snapshot, work / "sequential.parquet")
                times["sequential"].append(time.perf_counter() - started)

                point_hub_at(endpoint, work / f"cache-b{n}")
                started = time.perf_counter()
                analyze(REPO, work / "overlapped.parquet")
                times["overlapped"].append(time.perf_counter() - started)

                point_hub_at(endpoint, work / f"cache-c{n}")
                before = served_bytes(endpoint)
                started = time.perf_counter()
                analyze(REPO, work / "streamed.parquet", stream=True)
                times["streamed"].append(time.perf_counter() - started)
                served = served_bytes(endpoint) - before
                stored = list((work / f"cache-c{n}").rglob("*.safetensors"))
        download, sequential, overlapped, streamed = (min(times[k]) for k in times)

    mb = nbytes / 1e6
    print(f"checkpoint: {args.shards} shards, {mb:.0f} MB; link throttled to {rate / 1e6:.1f} MB/s")
    print(f"analysis of the local copy:      {compute:6.2f} s")
    print(f"download (snapshot_download):    {download:6.2f} s")
    print(f"download, then analyse:          {sequential:6.2f} s")
    print(f"overlapped (default hub road):   {overlapped:6.2f} s")
    share = served / nbytes
    print(f"streamed (--stream):             {streamed:6.2f} s "
          f"({share:.3f}x the checkpoint's bytes served, {len(stored)} shards stored)")  # fmt: skip
    ratio = overlapped / sequential
    print(f"overlapped / download-then-analyse: {ratio:.2f}x (target <= 0.65)")
    print(f"streamed / download-then-analyse:   {streamed / sequential:.2f}x")


if __name__ == "__main__":
    main()
