"""How many cores the engine counts: CPU affinity, capped by a container's cgroup CPU quota
(cgroup v2 cpu.max, v1 cfs quota and period), as Ray counts a node's CPUs."""

import pytest

from echox import cpu_threads
from echox.cli import main


def cgroup(tmp_path, files: dict[str, str], own: str = "0::/\n"):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(own)
    return cpu_threads.cpu_quota(tmp_path, tmp_path / "self-cgroup")


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # docker --cpus 1.5, cgroup v2
    ({"cpu.max": "max 100000\n"}, None),  # no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),  # no cgroup files at all (not Linux, or not mounted)
])
def test_cpu_quota_reads_either_cgroup_version(tmp_path, files, quota):
    assert cgroup(tmp_path, files) == quota


def test_the_process_own_cgroup_comes_before_the_root(tmp_path):
    files = {"cpu.max": "max 100000\n", "system.slice/echox.service/cpu.max": "50000 100000\n"}
    assert cgroup(tmp_path, files, own="0::/system.slice/echox.service\n") == 0.5


@pytest.mark.parametrize("quota, cores", [(None, 2), (1.5, 1), (0.5, 1), (64.0, 2)])
def test_usable_cores_is_capped_by_the_quota_and_at_least_one(monkeypatch, quota, cores):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: quota)
    assert cpu_threads.usable_cores() == cores


def test_serve_ray_counts_the_quota_not_the_host_cores(monkeypatch, capsys):
    """Ray counts a quota-limited node's CPUs from the quota, and would wait forever for more."""
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 2.0)
    assert main(["serve-ray", "--replicas", "3", "--demo"]) == 2
    error = capsys.readouterr().err
    assert "needs 3 CPUs (each replica reserves its threads); this process may use 2 (its CPU affinity" in error


def test_a_limit_on_an_enclosing_group_holds_for_the_groups_in_it(tmp_path):
    """A group of its own without a limit ("max") runs under its parents' quotas: the tightest counts."""
    files = {"cpu.max": "400000 100000\n", "kubepods/cpu.max": "200000 100000\n",
             "kubepods/pod1/cpu.max": "max 100000\n"}
    assert cgroup(tmp_path, files, own="0::/kubepods/pod1\n") == 2.0
