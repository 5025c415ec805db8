"""The launch scripts of examples/opensoraplan1.5: bash syntax, and every flag they pass exists (the command each
prints with ECHO_ONLY=1 is parsed by torchrun's and the entry point's own parsers); required environment and
absolute paths are enforced with one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_workspace import ROOT

EXAMPLES = ROOT / "examples" / "opensoraplan1.5"
SCRIPTS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".slurm"))


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK"))}
    env.update(PYTHON=sys.executable, ECHO_ONLY="1", PRETRAINED=str(tmp_path / "pretrained"),
               RUN_DIR=str(tmp_path / "run"))
    env.update(extra)
    return env


def _run(cmd, env, cwd=None):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bash_syntax(script):
    assert _run(["bash", "-n", str(script)], os.environ).returncode == 0


def _split_torchrun(argv):
    """``python -m torch.distributed.run <launcher> <script or -m module> <args>`` -> torchrun namespace."""
    from torch.distributed.run import get_args_parser

    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    return get_args_parser().parse_args(argv[3:])


def _node_env(tmp_path, **extra):
    return _env(tmp_path, **{"MASTER_ADDR": "node0", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8", **extra})


def test_train_sh_command_parses_and_uses_the_stage(tmp_path):
    import pretrain_sora

    out = _run([str(EXAMPLES / "train.sh"), "Video-4", "--log-interval", "10"], _node_env(tmp_path))
    assert out.returncode == 0, out.stderr
    run = _split_torchrun(out.stdout.splitlines())
    assert (run.nnodes, run.nproc_per_node, run.node_rank, run.rdzv_backend, run.rdzv_endpoint) == \
        ("2", "8", 1, "c10d", "node0:29500")
    assert run.log_dir == str(tmp_path / "run/logs/node-1") and run.tee == "3" and run.local_ranks_filter == "0"
    assert "SIGUSR1" in run.signals_to_handle
    assert run.training_script == "pretrain_sora.py"
    args = pretrain_sora.build_parser().parse_args(run.training_script_args)
    assert (args.tensor_model_parallel_size, args.sequence_parallel, args.micro_batch_size, args.global_batch_size) == \
        (4, True, 1, 512)
    assert args.log_interval == 10  # extra flags come last and win
    assert args.save == args.load == str(tmp_path / "run/ckpt")
    assert Path(args.mm_model).is_file() and Path(args.mm_model).is_absolute()


def test_preflight_and_dry_run_modes_parse(tmp_path):
    import pretrain_sora
    from mm.tools.preflight import build_parser as preflight_parser

    out = _run([str(EXAMPLES / "train.sh"), "Video-1"], _node_env(tmp_path, MODE="preflight"))
    assert out.returncode == 0, out.stderr
    run = _split_torchrun(out.stdout.splitlines())
    assert run.module and run.training_script == "mm.tools.preflight"
    preflight_parser().parse_args(run.training_script_args)
    out = _run([str(EXAMPLES / "train.sh"), "Video-1"], _env(tmp_path, MODE="dry-run", NNODES="64", NPROC_PER_NODE="8"))
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    assert argv[1] == "pretrain_sora.py"
    args = pretrain_sora.build_parser().parse_args(argv[2:])
    assert args.dry_run and args.world_size == 512


@pytest.mark.parametrize("drop,message", [("MASTER_ADDR", "error: MASTER_ADDR is not set"),
                                          ("NODE_RANK", "error: NODE_RANK is not set")])
def test_train_sh_requires_the_rendezvous_environment(tmp_path, drop, message):
    env = _node_env(tmp_path)
    env.pop(drop)
    out = _run([str(EXAMPLES / "train.sh"), "Video-4"], env)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr


def test_train_sh_refuses_relative_paths_and_bad_batches(tmp_path):
    out = _run([str(EXAMPLES / "train.sh"), "Video-4"], _node_env(tmp_path, RUN_DIR="runs/v4"))
    assert out.returncode == 2 and "RUN_DIR must be an absolute path" in out.stderr
    out = _run([str(EXAMPLES / "train.sh"), "Video-4"], _node_env(tmp_path, NPROC_PER_NODE="3"))
    assert out.returncode == 2 and "error: stage Video-4: world size 6 is not a multiple of TP x CP = 4" in out.stderr


def test_npu_variant_loads_cann_and_runs_train_sh(tmp_path):
    set_env = tmp_path / "set_env.sh"
    set_env.write_text("export CANN_LOADED=1\n")
    out = _run([str(EXAMPLES / "train_npu.sh"), "Video-4"], _node_env(tmp_path, ASCEND_SET_ENV=str(set_env)))
    assert out.returncode == 0, out.stderr
    assert _split_torchrun(out.stdout.splitlines()).training_script == "pretrain_sora.py"
    out = _run([str(EXAMPLES / "train_npu.sh"), "Video-4"], _node_env(tmp_path, ASCEND_SET_ENV=str(tmp_path / "no")))
    assert out.returncode == 2 and "CANN environment script not found" in out.stderr


def test_slurm_script_runs_preflight_then_one_torchrun_per_node(tmp_path):
    import pretrain_sora

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$2" == hostnames ]]; then printf "node0\\nnode1\\n"; '
        f'else echo "   Command={EXAMPLES / "train.slurm"} Video-4"; fi\n')
    # one task (node 1): record the srun options, then run the task's command with ECHO_ONLY=1
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'opts=(); while [[ "$1" == --* ]]; do opts+=("$1"); shift; done; echo "${{opts[*]}}" >> {log}\n'
        'SLURM_NODEID=1 "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node[0-1]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8")
    out = _run(["bash", str(EXAMPLES / "train.slurm"), "Video-4"], env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    commands = out.stdout.split(sys.executable)[1:]  # preflight, then training
    assert len(commands) == 2, out.stdout
    pre, train = (_split_torchrun([sys.executable] + c.split()) for c in commands)
    assert pre.module and pre.training_script == "mm.tools.preflight"
    assert (train.nnodes, train.node_rank, train.rdzv_endpoint, train.rdzv_id) == ("2", 1, "node0:29500", "42")
    pretrain_sora.build_parser().parse_args(train.training_script_args)
    srun = log.read_text().splitlines()
    assert all("--nodes=2" in s and "--ntasks-per-node=1" in s and "node%n" in s for s in srun), srun
    text = (EXAMPLES / "train.slurm").read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --output=", "#SBATCH --ntasks-per-node=1"):
        assert directive in text
    assert "#SBATCH --nodes" not in text  # nodes come from the submission


def test_inference_script_parses(tmp_path):
    from mm.inference.cli import build_parser

    out = _run([str(EXAMPLES / "inference_t2v_1_5.sh")], _env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = _split_torchrun(out.stdout.splitlines())
    args = build_parser().parse_args(run.training_script_args)
    assert args.t5 == str(tmp_path / "pretrained/t5-v1_1-xl") and args.save_path == str(tmp_path / "samples/osp15")


def test_slurm_usr1_reaches_the_training_step_and_requeues(tmp_path):
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, pid_file = tmp_path / "events.log", tmp_path / "step.pid"
    tools = {
        "scontrol": f'if [[ "$1 $2" == "show hostnames" ]]; then echo node0; '
                    f'elif [[ "$1" == requeue ]]; then echo "requeue $2" >> {log}; fi',
        # the training step: waits until SIGUSR1 arrives (the workers' save), then exits 0
        "srun": f'trap \'echo "step got USR1" >> {log}; exit 0\' USR1; echo $$ > {pid_file}; '
                'while true; do sleep 0.1; done',
        "scancel": f'echo "scancel $*" >> {log}; kill -USR1 "$(cat {pid_file})"',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node0",
               SLURM_NNODES="1", SLURM_GPUS_ON_NODE="8", PREFLIGHT="0", OSP_EXAMPLES=str(EXAMPLES))
    proc = subprocess.Popen(["bash", str(EXAMPLES / "train.slurm"), "Video-4"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGUSR1)  # what SLURM does 10 minutes before the time limit (--signal=B:USR1@600)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["scancel --signal=USR1 7", "step got USR1", "requeue 7"]
