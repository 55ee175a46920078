"""Writer threads beside threads that hold Python's GIL: one writer against several.

    python benchmarks/writers_gil.py --readers 8 --writers 1,4,8,p --n 2000 [--work /some/disk]

extract's writer saves one ``.npy`` per item with ``ducho_fast.outputs.atomic.NpyFiles``:
four system calls a file (open, write, link, close), each giving the GIL away. Beside reader
threads that decode images, which hold the GIL between the library calls that release it, a
writer waits to get it back after each call, up to the switch interval (5 ms). This saves N
features of ``--dim`` float32 values (EfficientNet-Lite0's 1280 by default) into a new
folder, each ``--writers`` count in turn (``runtime.writers``: several threads, each saving
batches of ``--batch`` files), while ``--readers`` threads decode and resize a generated
640x480 JPEG to 224x224 and normalize it, in a loop, as extract's readers do. ``--readers 0``:
the writers alone. ``p`` among the counts: one writer process instead (``CHILD``: the batches
go to it through a pipe, so this side makes one system call a batch instead of four a file;
its start, about 0.1 s here, is timed too). Files/s per count and round; ratios against one
writer within each round.
Every file of the last round is checked to hold what ``np.save`` writes. The CPU cost of
creating a file there (``common.file_create_ms``) is printed before and after the rounds: on a
disk in a state where creating a file is dear (this VM's ext4 after thousands of deletions),
the kernel's work per file runs without the GIL, and several writers gain from that alone.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_work_option, file_create_ms, paired, report, work_folder

PROCESS = 0  # the writer count that stands for one writer process


def jpeg() -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def reader(data: bytes, stop: threading.Event) -> None:
    from PIL import Image

    while not stop.is_set():
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224))
        array = np.asarray(image, dtype=np.float32) / 255.0
        (array - 0.5) / 0.5


# A writer process (``--writers`` count ``p``): the batches go to it through a pipe, one
# length-prefixed pickle a batch (one system call a batch on this side, where the GIL is
# contended, against four a file), and it saves them with ``NpyFiles`` under a GIL of its
# own. It answers each batch with one byte. Not how extract writes: what it would gain.
CHILD = """
import pickle, struct, sys
from ducho_fast.outputs.atomic import NpyFiles
files, source, sink = NpyFiles(), sys.stdin.buffer, sys.stdout.buffer
while header := source.read(8):
    for path, array in pickle.loads(source.read(struct.unpack("<Q", header)[0])):
        files.save(path, array)
    sink.write(b"."); sink.flush()
"""


def save_in_process(paths: list[Path], array: np.ndarray, batch: int) -> None:
    import pickle
    import struct
    import subprocess

    pipe = subprocess.PIPE
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=pipe, stdout=pipe)
    assert child.stdin is not None and child.stdout is not None
    batches = [paths[k : k + batch] for k in range(0, len(paths), batch)]
    for part in batches:
        data = pickle.dumps([(path, array) for path in part], protocol=5)
        child.stdin.write(struct.pack("<Q", len(data)) + data)
    child.stdin.close()
    answered = child.stdout.read()
    if child.wait() != 0 or len(answered) != len(batches):
        raise RuntimeError(f"the writer process answered {len(answered)} of {len(batches)} batches")


def save_all(writers: int, paths: list[Path], array: np.ndarray, batch: int) -> None:
    from ducho_fast.outputs.atomic import NpyFiles

    if writers == PROCESS:
        save_in_process(paths, array, batch)
        return
    files = NpyFiles()

    def save_batch(part: list[Path]) -> None:
        for path in part:
            files.save(path, array)

    batches = [paths[k : k + batch] for k in range(0, len(paths), batch)]
    if writers == 1:
        for part in batches:
            save_batch(part)
        return
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(save_batch, batches))


def one_round(
    writers: int, readers: int, n: int, dim: int, batch: int, work: Path, data: bytes
) -> tuple[float, Path]:
    folder = Path(tempfile.mkdtemp(dir=work, prefix=f"w{writers}-"))
    array = np.random.default_rng(1).random(dim, dtype=np.float32)[np.newaxis]
    stop = threading.Event()
    threads = [threading.Thread(target=reader, args=(data, stop)) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        began = time.perf_counter()
        save_all(writers, [folder / f"item{k}.npy" for k in range(n)], array, batch)
        took = time.perf_counter() - began
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return n / took, folder


def key(count: int) -> str:
    return "p" if count == PROCESS else str(count)


def label(count: int) -> str:
    return "a writer process" if count == PROCESS else f"{count} writer thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="files a round (default 2000)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=32, help="files a writer takes at once")
    parser.add_argument("--readers", type=int, default=8, help="decoding threads (default 8)")
    parser.add_argument(
        "--writers", default="1,4,8", help="writer thread counts, p: a writer process; 1 first"
    )
    parser.add_argument("--repeats", type=int, default=2)
    add_work_option(parser)
    args = parser.parse_args()
    try:
        counts = [PROCESS if c == "p" else int(c) for c in args.writers.split(",") if c]
    except ValueError:
        counts = []
    if 1 not in counts or any(c < 0 for c in counts):
        sys.exit("--writers: counts >= 1 or p (a writer process), with 1 among them")
    work = work_folder(args.work, "ducho-bench-writers-gil-")
    data = jpeg()
    rates: dict[int, list[float]] = {c: [] for c in counts}
    last: dict[int, Path] = {}
    print(f"{args.n} files of {args.dim} float32, {args.readers} decoding threads, in {work}")
    creates = [file_create_ms(work)]
    for k in range(max(1, args.repeats)):
        order = counts if k % 2 == 0 else counts[::-1]
        for count in order:
            rate, folder = one_round(count, args.readers, args.n, args.dim, args.batch, work, data)
            rates[count].append(rate)
            print(f"  round {k + 1}: {label(count)} {rate:8.0f} files/s", flush=True)
            if count in last:
                shutil.rmtree(last[count])
            last[count] = folder
    expected = io.BytesIO()
    np.save(expected, np.random.default_rng(1).random(args.dim, dtype=np.float32)[np.newaxis])
    for folder in last.values():
        files = sorted(folder.glob("*.npy"))
        assert len(files) == args.n and all(f.read_bytes() == expected.getvalue() for f in files)
        shutil.rmtree(folder)
    creates.append(file_create_ms(work))
    print(f"creating a file in {work}: {creates[0]:.3f} ms of CPU before, {creates[1]:.3f} after")
    seconds = {key(c): [args.n / r for r in v] for c, v in rates.items()}
    ratios = {f"{label(c)} vs 1": paired(seconds, key(c), "1") for c in counts if c != 1}
    report(
        [(label(c), float(np.median(rates[c])), "files/s") for c in counts],
        {
            "benchmark": "writers_gil",
            "n": args.n,
            "dim": args.dim,
            "readers": args.readers,
            "file_create_ms": [round(c, 3) for c in creates],
            "files_per_second": {key(c): round(float(np.median(v)), 1) for c, v in rates.items()},
            "ratios": {name: r["median"] for name, r in ratios.items()},
            "rounds": args.repeats,
        },
        ratios,
    )


if __name__ == "__main__":
    main()
