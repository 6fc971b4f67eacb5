"""The ``axctl`` command line: status, top, submit, kill, wait, replay.

Each subcommand is a few file operations on the mounted tree (see ``tree.py``); the
exit status says how a task ended (see EPILOG).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from tools.axctl import overview, top
from tools.axctl.tree import ENDED, Tree, TreeError

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_KILLED = 3
EXIT_ERROR = 4
EXIT_DEADLINE = 5
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
ENDINGS = {"done": EXIT_DONE, "failed": EXIT_FAILED, "killed": EXIT_KILLED}

EPILOG = """\
exit status:
  0    done: the task ended done (submit --wait, wait), or the command worked
  1    the task failed (its error file says why); replay: the tokens differed
  2    bad usage: an unknown option, a missing argument, a bad --param, an empty prompt
  3    the task was killed
  4    the tree is not mounted there, has no such task or file, or refused a write
  5    the task reached its deadline (config deadline): its text so far is kept
  124  --timeout ran out while the task was still going
  130  interrupted (Ctrl-C): axctl stopped waiting, the task goes on

The mount point is --root, else $AXFS_ROOT, else /ax. Progress on long waits goes to
stderr, and only when stderr is a terminal.
"""


class Progress:
    """One line on stderr, redrawn in place; silent unless stderr is a terminal."""

    def __init__(self) -> None:
        self.active = sys.stderr.isatty()
        self._shown = False
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        with self._lock:
            if self.active:
                width = shutil.get_terminal_size().columns - 1
                sys.stderr.write("\r\x1b[K" + text[:width])
                sys.stderr.flush()
                self._shown = True

    def stop(self) -> None:
        """Clear the line and show nothing more."""
        with self._lock:
            if self._shown:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
                self._shown = False
            self.active = False


def describe(task: str, s: dict[str, str]) -> str:
    """A progress line from a status: where the task is and how fast it goes."""
    state = s.get("state", "?")
    line = f"task {task}: {state}"
    if state in ("queued", "preempted", "draft"):
        line += f", waited {float(s.get('waited_ms', '0') or 0) / 1000:.1f} s"
    if state == "running":
        line += (f", {s.get('prefilled_tokens', '?')}/{s.get('prompt_tokens', '?')} prompt tokens, "
                 f"{s.get('generated_tokens', '?')} generated")
        if s.get("decode_tokens_per_second", "-") != "-":
            line += f", {s['decode_tokens_per_second']} tok/s"
    return line


def ending(tree: Tree, task: str) -> int:
    """The exit status for how ``task`` ended; failures and kills are told on stderr."""
    s = tree.status(task)
    state = s.get("state", "?")
    if state == "failed":
        print(f"axctl: task {task} failed: {tree.error(task) or 'no reason given'}", file=sys.stderr)
    elif state == "killed":
        print(f"axctl: task {task} was killed", file=sys.stderr)
    elif s.get("finish_reason") == "deadline":
        print(f"axctl: task {task} reached its deadline", file=sys.stderr)
        return EXIT_DEADLINE
    return ENDINGS.get(state, EXIT_ERROR)


def await_task(tree: Tree, task: str, stream: bool, timeout: float | None) -> int:
    """Follow ``task`` to its end (its text to stdout when ``stream``); its exit status.

    The stream is read in a thread, so that the main thread can show progress, keep
    the time limit and take Ctrl-C while a read waits in the kernel.
    """
    progress = Progress()
    out = sys.stdout.buffer
    last = bytearray(b"\n")
    failure: list[BaseException] = []

    def sink(chunk: bytes) -> None:
        progress.stop()  # the text itself shows progress from here on
        out.write(chunk)
        out.flush()
        last[:] = chunk[-1:]

    def follow() -> None:
        try:
            tree.follow(task, sink if stream else None)
        except BaseException as e:
            failure.append(e)

    reader = threading.Thread(target=follow, name=f"follow-{task}", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout if timeout is not None else None
    next_look = 0.0
    try:
        while reader.is_alive():
            reader.join(0.1)
            now = time.monotonic()
            if progress.active and now >= next_look and reader.is_alive():
                progress.show(describe(task, tree.status(task)))
                next_look = now + 0.5
            if deadline is not None and now > deadline and reader.is_alive():
                progress.stop()
                state = tree.status(task).get("state", "?")
                print(f"axctl: task {task} is still {state} after {timeout:g} s", file=sys.stderr)
                return EXIT_TIMEOUT
    except KeyboardInterrupt:
        progress.stop()
        print(f"\naxctl: stopped waiting; task {task} goes on (`axctl kill {task}` ends it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.stop()
    if failure:
        raise failure[0]
    if stream and last != b"\n" and sys.stdout.isatty():
        out.write(b"\n")  # leave the shell's prompt on a line of its own
        out.flush()
    return ending(tree, task)


# -- subcommands -----------------------------------------------------------------------


def cmd_status(tree: Tree, args: argparse.Namespace) -> int:
    if args.task:
        sys.stdout.write(tree.read(f"tasks/{tree.resolve(args.task)}/status"))
    else:
        sys.stdout.write(overview.render(tree))
    return EXIT_DONE


def cmd_top(tree: Tree, args: argparse.Namespace) -> int:
    if args.once or not sys.stdout.isatty():
        width = shutil.get_terminal_size((160, 40)).columns if sys.stdout.isatty() else 160
        sys.stdout.write(top.once(tree, width))
        return EXIT_DONE
    top.run(tree, args.interval)
    return EXIT_DONE


def config_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    lines = [f"model {args.model}"] if args.model else []
    for param in args.param:
        key, eq, value = param.partition("=")
        if not eq or not key.strip():
            parser.error(f"--param wants key=value, not {param!r}")
        lines.append(f"{key.strip()} {value}")
    return "".join(f"{line}\n" for line in lines)


def cmd_submit(tree: Tree, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.prompt and args.prompt != ["-"]:
        prompt = " ".join(args.prompt).encode()
    else:
        if sys.stdin.isatty():
            print("axctl: reading the prompt from the terminal; end it with Ctrl-D", file=sys.stderr)
        prompt = sys.stdin.buffer.read()
    if not prompt.strip():
        parser.error("the prompt is empty")
    task = tree.submit(prompt, config_text(args, parser), args.name)
    if not args.wait:
        print(task)
        return EXIT_DONE
    return await_task(tree, task, stream=True, timeout=args.timeout)


def cmd_wait(tree: Tree, args: argparse.Namespace) -> int:
    """Wait for each task in turn: 0 when all ended done, else the first other ending."""
    code = EXIT_DONE
    start = time.monotonic()
    for given in args.tasks or ["latest"]:
        task = tree.resolve(given)
        left = None if args.timeout is None else max(0.0, args.timeout - (time.monotonic() - start))
        result = await_task(tree, task, stream=False, timeout=left)
        if result in (EXIT_TIMEOUT, EXIT_INTERRUPTED):
            return result
        code = code or result
    return code


def cmd_kill(tree: Tree, args: argparse.Namespace) -> int:
    code = EXIT_DONE
    for given in args.tasks:
        try:
            task = tree.resolve(given)
            before = tree.status(task).get("state")
            tree.control(task, "kill")
        except TreeError as e:
            print(f"axctl: {e}", file=sys.stderr)
            code = EXIT_ERROR
            continue
        if before in ENDED:
            print(f"axctl: task {task} had already ended ({before})", file=sys.stderr)
    return code


def cmd_replay(tree: Tree, args: argparse.Namespace) -> int:
    """Re-run a task through replay/ID and say whether the same tokens came out.

    ``replay/ID/ctl`` takes ``run``; ``replay/ID/result`` then reads ``match`` or a
    line starting ``mismatch`` (or ``error``) once the re-run is over.
    """
    if not tree.path("replay").is_dir():
        raise TreeError(f"this tree has no replay directory ({tree.path('replay')}): the axfs "
                        "mounted there does not support replay")
    task = tree.resolve(args.task)
    base = f"replay/{task}"
    if not tree.path(base).is_dir():
        raise TreeError(f"no replay of task {task!r} ({tree.path(base)} does not exist)")
    if args.timeline:
        sys.stdout.write(tree.read(f"{base}/timeline"))
    try:
        fd = os.open(tree.path(f"{base}/ctl"), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"run\n")
        finally:
            os.close(fd)
    except OSError as e:
        raise TreeError(f"writing {base}/ctl failed: {e.strerror}") from None
    progress = Progress()
    start = time.monotonic()
    try:
        while True:
            result = tree.read(f"{base}/result").strip()
            word = result.split(" ", 1)[0].rstrip(":") if result else ""
            if word in ("match", "mismatch", "error"):
                break
            progress.show(f"replaying task {task}: {result or 'started'}, {time.monotonic() - start:.0f} s")
            time.sleep(0.2)
    except KeyboardInterrupt:
        progress.stop()
        return EXIT_INTERRUPTED
    progress.stop()
    print(result)
    return {"match": EXIT_DONE, "mismatch": EXIT_FAILED}.get(word, EXIT_ERROR)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="axctl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Look at and control an axfs tree. Everything goes through the tree's files.")
    p.add_argument("--root", type=Path, help="the mount point (default: $AXFS_ROOT, else /ax)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="the box at a glance: models, devices, memory, queue, tasks")
    s.add_argument("task", nargs="?", help="show this task's status file instead")

    t = sub.add_parser("top", help="a live view of the tasks (keys: q < > r k a, arrows)",
                       description="A live view of the tasks, refreshed in the terminal. Keys: "
                       "up/down select, < and > change the sort column, r reverses it, k kills the "
                       "selected task, a shows or hides ended tasks, q quits.")
    t.add_argument("-d", "--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--once", action="store_true",
                   help="print one frame and exit (also what happens when stdout is not a terminal)")

    m = sub.add_parser("submit", help="queue a prompt; print its id, or --wait for the answer",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    m.add_argument("prompt", nargs="*", help="the prompt (its words are joined); none or - reads stdin")
    m.add_argument("--model", help="a model's name in models/")
    m.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a config parameter (max_tokens, temperature, seed, stop, priority, ...); repeatable")
    m.add_argument("--name", help="the task's name (default: a number, or axctl-DATE-TIME-PID with "
                   "--model or --param)")
    m.add_argument("-w", "--wait", action="store_true",
                   help="stream the answer to stdout; the exit status says how the task ended")
    m.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")

    w = sub.add_parser("wait", help="wait for tasks to end; the exit status says how they ended",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    w.add_argument("tasks", nargs="*", metavar="ID", help="task ids or names (default: latest)")
    w.add_argument("--timeout", type=float, help="give up after this many seconds in all")

    k = sub.add_parser("kill", help="end tasks (write kill to their ctl)")
    k.add_argument("tasks", nargs="+", metavar="ID")

    r = sub.add_parser("replay", help="re-run a task from replay/ID and check the same tokens come out")
    r.add_argument("task", metavar="ID")
    r.add_argument("--timeline", action="store_true", help="print the task's timeline first")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    tree = Tree(args.root or Path(os.environ.get("AXFS_ROOT") or "/ax"))
    try:
        tree.check()
        if args.command == "submit":
            return cmd_submit(tree, args, p)
        commands = {"status": cmd_status, "top": cmd_top, "wait": cmd_wait, "kill": cmd_kill,
                    "replay": cmd_replay}
        return commands[args.command](tree, args)
    except TreeError as e:
        print(f"axctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
