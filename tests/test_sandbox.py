"""The sandbox for model-written code: hostile programs are contained, reported as failed, and leave
the machine as it was; HumanEval's canonical solutions all pass and wrong ones all fail."""

import os
import subprocess
import time

import pytest

from mightylm.evaluate.sandbox import Limits, isolation, run_program

HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n",
    "write outside": "open({victim_dir!r} + '/planted.txt', 'w').write('x')\n",
    "delete outside": "import os\nos.remove({victim!r})\n",
    "read secrets": "import os, sys\nassert 'MIGHTY_TEST_SECRET' not in os.environ, 'leaked'\n"
                    "print(sorted(os.environ))\nsys.exit(3)\n",
    "open a socket": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n",
    "reach loopback": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n",
}


def _sandboxed_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "program.py" in line and "ps -eo" not in line]


@pytest.fixture
def listener():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server
    server.close()


def test_hostile_programs_are_contained(tmp_path, monkeypatch, listener):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    monkeypatch.setenv("MIGHTY_TEST_SECRET", "sk-do-not-leak")
    project_files = sorted(os.listdir("."))
    limits = Limits(timeout=2.0, memory_mb=512, processes=16)
    for name, source in HOSTILE.items():
        source = source.format(victim=str(victim), victim_dir=str(tmp_path), port=listener.getsockname()[1])
        t0 = time.perf_counter()
        outcome = run_program(source, limits)
        assert not outcome.passed, f"{name}: {outcome}"
        assert time.perf_counter() - t0 < limits.timeout + 3, f"{name} was not stopped in time"
        assert "sk-do-not-leak" not in outcome.stdout + outcome.stderr
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert sorted(os.listdir(".")) == project_files
    listener.settimeout(0.1)
    with pytest.raises(OSError):  # nothing connected to our loopback listener
        listener.accept()
    deadline = time.time() + 5
    while _sandboxed_processes() and time.time() < deadline:  # killed processes take a moment to be reaped
        time.sleep(0.1)
    assert _sandboxed_processes() == []


def test_outcomes_report_pass_fail_and_timeout():
    assert run_program("print('ok')").status == "passed"
    failed = run_program("assert 1 + 1 == 3, 'arithmetic'")
    assert failed.status == "failed" and "AssertionError: arithmetic" in failed.stderr
    assert run_program("import time\ntime.sleep(10)", Limits(timeout=0.5)).status == "timeout"


@pytest.mark.skipif(not isolation()["namespaces"], reason="needs Linux namespaces (unshare)")
def test_network_and_file_system_are_closed():
    outcome = run_program("import socket\nprint(socket.if_nameindex())")  # only a downed loopback interface
    assert outcome.passed and "eth" not in outcome.stdout, outcome
    denied = run_program("open('/etc/passwd', 'a')").stderr  # read-only, or not ours to write
    assert "Read-only file system" in denied or "Permission denied" in denied
    scratch = run_program("import os\nopen('/tmp/x', 'w').write('x')\nprint(sorted(os.listdir('/tmp')))")
    assert scratch.passed and "'x'" in scratch.stdout


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    from mightylm.evaluate.humaneval import evaluate, read_problems
    from mightylm.evaluate.results import ResultStore

    problems = read_problems()
    assert len(problems) == 164
    right = [{"id": f"{t}#0", "task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    summary = evaluate(ResultStore(tmp_path, "right", {}), problems, samples=right, batch_size=32, progress=False)
    assert summary["metrics"] == {"pass@1": 1.0} and summary["problems"] == 164
    ids = list(problems)  # each problem gets the next problem's solution
    wrong = [{"id": f"{t}#0", "task_id": t, "completion": problems[ids[(i + 1) % len(ids)]]["canonical_solution"]}
             for i, t in enumerate(ids)]
    summary = evaluate(ResultStore(tmp_path, "wrong", {}), problems, samples=wrong, batch_size=32, progress=False)
    assert summary["metrics"] == {"pass@1": 0.0}
