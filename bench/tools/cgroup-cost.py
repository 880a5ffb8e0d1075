#!/usr/bin/env python3
"""What the kernel charges for the cgroup work of one plugin spawn.

For each cgroup hierarchy the supervisor uses (v2, v1 pids, v1 memory):
create fifty cgroups, move one sleeping process through each of them by
writing its pid to `cgroup.procs`, and remove them again. Prints the mean
time of each step. Needs root and a machine with those hierarchies mounted
where `aurora-bench` runs; it creates and removes `aurora-cost-test` beside
this process's own cgroups.
"""

import os
import subprocess
import time

COUNT = 50
HIERARCHIES = {
    "v2": ("/sys/fs/cgroup/unified", ""),
    "pids": ("/sys/fs/cgroup/pids", "pids"),
    "memory": ("/sys/fs/cgroup/memory", "memory"),
}


def own_cgroups():
    paths = {}
    with open("/proc/self/cgroup") as membership:
        for line in membership:
            _, controllers, path = line.strip().split(":", 2)
            paths[controllers] = path
    return paths


def mean_us(start, count):
    return (time.perf_counter() - start) / count * 1e6


def measure(mount, own):
    base = os.path.join(mount + own, "aurora-cost-test")
    os.makedirs(base, exist_ok=True)
    start = time.perf_counter()
    for i in range(COUNT):
        os.mkdir(f"{base}/c{i}")
    create = mean_us(start, COUNT)

    sleeper = subprocess.Popen(["sleep", "60"])
    start = time.perf_counter()
    for i in range(COUNT):
        with open(f"{base}/c{i}/cgroup.procs", "w") as procs:
            procs.write(str(sleeper.pid))
    move = mean_us(start, COUNT)
    with open(f"{base}/cgroup.procs", "w") as procs:
        procs.write(str(sleeper.pid))
    sleeper.kill()
    sleeper.wait()

    start = time.perf_counter()
    for i in range(COUNT):
        os.rmdir(f"{base}/c{i}")
    remove = mean_us(start, COUNT)
    os.rmdir(base)
    return create, move, remove


def main():
    own = own_cgroups()
    for name, (mount, controller) in HIERARCHIES.items():
        if not os.path.isdir(mount):
            print(f"{name}: not mounted at {mount}")
            continue
        create, move, remove = measure(mount, own.get(controller, "/"))
        print(f"{name}: create {create:.0f} us, move a process {move:.0f} us, remove {remove:.0f} us")


if __name__ == "__main__":
    main()
