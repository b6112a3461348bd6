"""Resident memory of a running service's Serve replicas, at idle (run by hand against `make serve`; prints
numbers). The ingress replica's figure is the one the torch-free ingress changes: it validates and routes, and
imports no torch (tests/unit/test_ingress_imports.py).

.venv/bin/python bench/replica_memory.py [--results bench/RESULTS.md]
"""

import argparse
import datetime
import platform

import psutil


def replicas() -> list[tuple[str, int, float]]:
    """(deployment, pid, RSS MiB) of every Serve replica process on this machine (Ray titles them
    `ray::ServeReplica:<app>:<deployment>`)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        title = " ".join(process.info.get("cmdline") or [])
        if "ServeReplica:" not in title:
            continue
        deployment = title.split("ServeReplica:", 1)[1].split()[0]
        found.append((deployment, process.info["pid"], process.info["memory_info"].rss / 2**20))
    return sorted(found)


def torch_loaded(pid: int) -> bool:
    try:
        return any("libtorch" in mapping.path for mapping in psutil.Process(pid).memory_maps())
    except (psutil.Error, OSError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="a name for this run (e.g. the commit)")
    parser.add_argument("--results", help="append the table to this Markdown file")
    args = parser.parse_args()
    title = f"### {datetime.datetime.now():%Y-%m-%d %H:%M} replica memory at idle {args.label} ({platform.machine()})"
    lines = [title, "", "| replica | pid | RSS | torch loaded |", "| --- | --- | --- | --- |"]
    for deployment, pid, rss in replicas():
        lines.append(f"| {deployment} | {pid} | {rss:.0f} MiB | {'yes' if torch_loaded(pid) else 'no'} |")
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as results:
            results.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
