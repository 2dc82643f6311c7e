"""The README's Slurm scripts, run with stand-ins for srun, scontrol, accelerate and torchrun.

The batch shell runs once, on the first node; ``srun`` then starts the command on every node. A
per-node variable expanded by the batch shell would give every node the first node's value.
"""
import re
import subprocess

from tests.conftest import REPO

FAKES = {
    "scontrol": 'echo node-a; echo node-b',
    # srun: the same command once per node, each with its own SLURM_NODEID, as Slurm runs it.
    "srun": 'for n in 0 1; do SLURM_NODEID=$n "$@"; done',
    "accelerate": 'echo "accelerate $*" >> "$LAUNCH_LOG"',
    "torchrun": 'echo "torchrun $*" >> "$LAUNCH_LOG"',
}


def slurm_scripts() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Many GPUs, many nodes"):]
    section = section[: section.index("\n## ", 3)]
    return [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "srun" in b]


def launches(tmp_path, script: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "launches.txt"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LAUNCH_LOG": str(log), "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "42"}
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=True, timeout=60)
    return log.read_text().splitlines()


def test_each_node_gets_its_own_rank_in_the_readme_slurm_scripts(tmp_path):
    accelerate, torchrun = slurm_scripts()
    lines = launches(tmp_path, accelerate)
    assert len(lines) == 2
    assert [re.search(r"--machine_rank (\S+)", line).group(1) for line in lines] == ["0", "1"]
    for line in lines:
        assert "--num_machines 2 " in line and "--num_processes 16 " in line and "--main_process_ip node-a " in line
        assert line.endswith("data.paths=[/shared/prompts/*.parquet]")
    lines = launches(tmp_path, "export MASTER=$(scontrol show hostnames x | head -n 1)\n" + torchrun)
    assert len(lines) == 2 and lines[0] == lines[1]  # c10d rendezvous: no per-node argument at all
    assert "--nnodes 2 " in lines[0] and "--rdzv_endpoint node-a:29500 " in lines[0] and "--rdzv_id 42 " in lines[0]
