"""Probe: resident memory of a command over time (psutil, every 0.1 s), as the maximum per 3-second bucket.

Used to see which phase of an offloaded job sets its peak, e.g. on a 4-block random Llama:

  python experiments/make_random_llama.py /tmp/rand4 --layers 4
  python experiments/probes/rss_timeline.py fedprune protocol=centralized model.path=/tmp/rand4 \\
      model.name=rand4 model.offload=true pruner=wanda data.calib_windows=32 data.seq_len=512 \\
      data.eval_windows=4 eval_batch_size=1 progress=false hydra.run.dir=/tmp/run4

Compare the buckets with the timestamps of the job's log lines (dense perplexity, pruned perplexity).
"""

import subprocess
import sys
import time

import psutil


def main(command: list[str]) -> None:
    start = time.time()
    process = subprocess.Popen(command)
    watched = psutil.Process(process.pid)
    peaks: dict[int, float] = {}
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        bucket = int((time.time() - start) // 3) * 3
        peaks[bucket] = max(peaks.get(bucket, 0.0), rss)
        time.sleep(0.1)
    print(f"started {time.strftime('%H:%M:%S', time.localtime(start))}; seconds, max RSS MiB:")
    for bucket, rss in sorted(peaks.items()):
        print(f"{bucket:5d} {rss:8.0f}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
