"""The tree, as a table: every file and directory of the mounted tree is one row here
(the row types are axfs.fs.tree's), and the tree's own README is written from the rows'
lines, so that it cannot drift from them.

A new read-only file of a task is one row in TASK's ``files`` and a function that
renders its text from the task (as ``timeline``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator

from axfs import privacy, replay, tokens
from axfs.errors import Exists
from axfs.fs import reads, views, writes
from axfs.fs.tree import Dir, Entry, File, Link, Mounted, Node, Owner
from axfs.models import ModelCopy
from axfs.task import Task
from drivers import devices

Render = Callable[[Mounted, Node, int], bytes]


def task_text(text: Callable[[Mounted, Task], str]) -> Render:
    """A task's file rendered from the task (node.name is its id)."""
    return lambda m, node, uid: text(m, m.kernel.get(node.name)).encode()


def nothing(m: Mounted, node: Node, uid: int) -> bytes:
    """A control file reads empty."""
    return b""


def goes_with_its_owner(m: Mounted, node: Node, uid: int) -> None:
    """A task's (or model's) files go with it: unlinking one succeeds and changes
    nothing, so that ``rm -r tasks/ID`` reaches the rmdir that removes the task."""


def task_ids(m: Mounted, uid: int) -> list[str]:
    """The tasks uid finds in a listing (on a multi-user tree, its own: axfs.privacy),
    ids in number order, then names."""
    who = privacy.viewer(m.multi_user, uid)
    ids = [i for i, t in m.kernel.tasks.items() if privacy.sees_task(who, t.uid)]
    return sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))


def model_path(m: Mounted, name: str) -> str:
    entry = m.kernel.registry.entries.get(name)
    return entry.path if entry else ""


# -- the renderers -----------------------------------------------------------------------


def status(m: Mounted, task: Task) -> str:
    runtime = m.kernel.local(task.config.model)
    return views.status(task, runtime.kv.cell_bytes if runtime else 0)


def timeline(m: Mounted, task: Task) -> str:
    return replay.timeline(task, m.kernel.model_sha)


def token_lines(m: Mounted, task: Task) -> str:
    return tokens.render(task, m.kernel.piece_of(task))


# -- tasks/ ------------------------------------------------------------------------------

TASK = Dir("ID", 0o755, "a task; rm -r tasks/ID kills it if it runs and removes it", owner=Owner.TASK,
           remove=lambda m, node, uid: m.kernel.remove(m.kernel.get(node.name)), files=(
    File("prompt", 0o644, "the prompt as submitted (for a mkdir'ed draft: write it to submit)",
         owner=Owner.TASK, render=task_text(lambda m, t: t.prompt), write=writes.write_prompt,
         submit=writes.submit_draft, draft_only=True, remove=goes_with_its_owner),
    File("stream", 0o444, "the generated text; a read waits for more text or the end (EOF)",
         owner=Owner.TASK, read=reads.stream, blocks=True, remove=goes_with_its_owner,
         length=lambda m, node, uid: len(m.kernel.get(node.name).output)),
    File("status", 0o444, "state (draft queued running preempted done failed killed) and "
         "counters, one \"key value\" per line", owner=Owner.TASK, render=task_text(status),
         remove=goes_with_its_owner),
    File("config", 0o644, "parameters, \"key value\" lines: model max_tokens temperature "
         "top_k top_p seed stop priority chat format deadline min_p repeat_penalty "
         "repeat_last_n presence_penalty frequency_penalty logprobs; writable until the task "
         "starts; applied at close, all or nothing; > resets the rest, >> adds", owner=Owner.TASK, edit=True,
         render=task_text(lambda m, t: t.config.render()), write=writes.write_config,
         apply=lambda m, t, text, reset: m.kernel.configure(t, text, reset),
         remove=goes_with_its_owner),
    File("schema", 0o644, "a JSON Schema the output must validate against; writable while a "
         "draft; compiled at close (a bad one: EINVAL, and the prompt is refused)",
         owner=Owner.TASK, edit=True, draft_only=True,
         render=task_text(lambda m, t: t.config.schema), write=writes.write_constraint,
         apply=lambda m, t, text, reset: m.kernel.constrain(t, "schema", text, reset),
         remove=goes_with_its_owner),
    File("grammar", 0o644, "a GBNF grammar (llama.cpp's) the output must match; a schema's "
         "reads back converted; writable while a draft, like schema", owner=Owner.TASK,
         edit=True, draft_only=True, render=task_text(lambda m, t: t.config.grammar),
         write=writes.write_constraint,
         apply=lambda m, t, text, reset: m.kernel.constrain(t, "grammar", text, reset),
         remove=goes_with_its_owner),
    File("ctl", 0o644, "write \"kill\" or \"priority N\" (a weight, 1-10000, default 100)",
         owner=Owner.TASK, render=task_text(lambda m, t: views.ctl(t)), write=writes.write_ctl,
         remove=goes_with_its_owner),
    File("fork", 0o644, "write a follow-up -> a child task continuing this task's text and "
         "sharing its KV; read the same open file -> the child's id", owner=Owner.TASK,
         read=reads.reply, write=writes.write_fork, submit=writes.submit_fork,
         remove=goes_with_its_owner),
    File("error", 0o444, "why the task failed, and why the last write to it was refused "
         "(until a later write to it succeeds)", owner=Owner.TASK,
         render=task_text(lambda m, t: m.kernel.error_text(t)), remove=goes_with_its_owner),
    File("timeline", 0o444, "what happened to the task, with times since it was submitted",
         owner=Owner.TASK, render=task_text(timeline), remove=goes_with_its_owner),
    File("tokens", 0o444, "a line a generated token, tab-separated: index, id, (with config "
         "logprobs N) its log-probability, the entropy it was drawn with and the N likeliest "
         "id:logprob, then its text escaped", owner=Owner.TASK, render=task_text(token_lines),
         remove=goes_with_its_owner),
    Link("parent", 0o777, "(a fork's) symlink to the task it continues", owner=Owner.TASK,
         shown=lambda m, node, uid: bool(m.kernel.get(node.name).parent),
         target=lambda m, node, uid: f"../{m.kernel.get(node.name).parent}",
         remove=goes_with_its_owner),
))


def make_task(m: Mounted, name: str, uid: int, gid: int) -> Node:
    return Node(TASK, m.kernel.create(uid, gid, name).id)


TASKS = Dir("tasks", 0o1777, "a directory each task; mkdir tasks/NAME: a draft task (write "
            "its config, then its prompt)", files=(  # anyone may mkdir; sticky, like /tmp
    File("new", 0o666, "write a prompt -> a new task is queued; read the same open file -> "
         "its id", read=reads.reply, write=writes.write_prompt, submit=writes.submit_new),
    Link("latest", 0o777, "symlink to your newest task",
         shown=lambda m, node, uid: m.kernel.latest(uid) is not None,
         target=lambda m, node, uid: t.id if (t := m.kernel.latest(uid)) else ""),
), varying=(TASK,), mkdir=make_task,
    find=lambda m, name: TASK if name in m.kernel.tasks else None,
    each=lambda m, uid: [(i, Node(TASK, i)) for i in task_ids(m, uid)])

# -- models/ -----------------------------------------------------------------------------

MODEL_FILE = Link("file", 0o777, "symlink to the model's GGUF file", owner=Owner.MODEL_PATH,
                  shown=lambda m, node, uid: bool(model_path(m, node.name)),
                  target=lambda m, node, uid: model_path(m, node.name),
                  remove=goes_with_its_owner)
MODEL = Dir("NAME", 0o755, "a model: a local GGUF file, or a remote one's endpoints", owner=Owner.MODEL,
            remove=lambda m, node, uid: m.kernel.unregister(node.name, uid), files=(
    File("info", 0o444, "the model: architecture, parameters, quantisation, context, size, "
         "device, loaded or not; a remote one's endpoints, each up, down, denied (it "
         "answered 401/403 to the key) or untrusted (bad certificate)", owner=Owner.MODEL,
         render=lambda m, node, uid: views.model_info(m.kernel, node.name).encode(),
         refresh=lambda m, node: m.kernel.refresh_info(node.name), remove=goes_with_its_owner),
    File("ctl", 0o644, "write \"load\", \"unload\", \"default\", \"endpoints URL [slots=N]... "
         "[key=PATH] [ca=PATH]\", \"gpu_layers N|auto\" or \"template [NAME]\"",
         owner=Owner.MODEL, render=nothing,
         write=writes.write_model_ctl, refresh=lambda m, node: m.kernel.refresh_info(node.name),
         remove=goes_with_its_owner),
    MODEL_FILE,
))
# Made by create (cp), never opened: EISDIR, as a file with neither render nor read.
COPY = File("FILENAME", 0o644, "a model file cp is copying in; at its close, models/NAME",
            owner=Owner.COPY, write=writes.write_copy, ignores_setattr=True,
            length=lambda m, node, uid: m.copies[node.name].size,
            remove=lambda m, node, uid: m.copies.pop(node.name).abort())


def copy_in(m: Mounted, filename: str, uid: int) -> tuple[File, ModelCopy]:
    """``cp FILE models/``: a model file copied into the state directory."""
    if filename in m.copies:
        raise Exists(f"models/{filename} is being copied in")
    copy = m.kernel.begin_copy(filename, uid)  # opens one file: no need for a thread
    m.copies[filename] = copy
    return COPY, copy


async def link_model(m: Mounted, name: str, target: str, uid: int) -> Node:
    """``ln -s FILE models/NAME``: the reply is the link (as the kernel expects); looked
    up again, models/NAME is the model's directory."""
    return Node(MODEL_FILE, (await m.kernel.register(name, target, uid=uid)).name)


def find_model(m: Mounted, name: str) -> Entry | None:
    return MODEL if name in m.kernel.models else COPY if name in m.copies else None


MODELS = Dir("models", 0o755, "ln -s FILE models/NAME or cp FILE models/: register a model; "
             "mkdir models/NAME: a remote one; rm -r models/NAME: remove it",
             varying=(MODEL, COPY), find=find_model, create=copy_in, symlink=link_model,
             mkdir=lambda m, name, uid, gid: Node(MODEL, m.kernel.add_remote(name, uid).name),
             each=lambda m, uid: [(n, Node(MODEL, n)) for n in sorted(m.kernel.models)]
             + [(f, Node(COPY, f)) for f in sorted(m.copies)])

# -- replay/ and users/ ------------------------------------------------------------------

REPLAY_TASK = Dir("ID", 0o755, "task ID run again, and compared", owner=Owner.REPLAY, files=(
    File("timeline", 0o444, "what happened to task ID, with times since it was submitted",
         owner=Owner.REPLAY, render=task_text(timeline)),
    File("ctl", 0o644, "write \"run\": run task ID again (alone, same tokens, parameters, "
         "seed)", owner=Owner.REPLAY, render=nothing, write=writes.write_replay_ctl),
    File("result", 0o444, "\"match N tokens\", or where the first token differs", owner=Owner.REPLAY,
         render=task_text(lambda m, t: m.kernel.replays.result(t))),
))
REPLAY = Dir("replay", 0o755, "a directory each task, to run it again", varying=(REPLAY_TASK,),
             find=lambda m, name: REPLAY_TASK if name in m.kernel.tasks else None,
             each=lambda m, uid: [(i, Node(REPLAY_TASK, i)) for i in task_ids(m, uid)])

USER = File("UID", 0o444, "your limits (tasks, prompt_bytes, max_tokens, tokens_per_hour), "
            "your use now, and your last refused writes with why", owner=Owner.USER,
            render=lambda m, node, uid: m.kernel.quota.render(int(node.name)).encode())
USERS = Dir("users", 0o755, "a file each user who made a task or was refused", varying=(USER,),
            find=lambda m, name: USER if name.isdigit() and int(name) in m.kernel.quota.users()
            else None,
            each=lambda m, uid: [(str(u), Node(USER, str(u))) for u in m.kernel.quota.users()])

# -- the root ----------------------------------------------------------------------------

ROOT = Dir("", 0o755, "", files=(
    File("README", 0o444, "this text", render=lambda m, node, uid: README),
    File("memory", 0o444, "the KV cache, like /proc/meminfo: used = running + cached, prefix "
         "cache hits, evictions, swap; a section a loaded model", volatile=True,
         render=lambda m, node, uid: views.memory(m.kernel).encode()),
    File("sched", 0o444, "the scheduler: policy, queue, batch, deadlines met and missed, each "
         "user's share and use; a section a loaded model", volatile=True,
         render=lambda m, node, uid: views.sched(m.kernel).encode()),
    File("trace", 0o444, "one line per scheduler event; tail -f follows it", volatile=True,
         read=reads.trace,
         length=lambda m, node, uid: m.kernel.trace.size_for(privacy.viewer(m.multi_user, uid))),
    File("devices", 0o444, "CPU and NVIDIA GPUs", volatile=True,
         render=lambda m, node, uid: devices.render().encode()),
    MODELS, TASKS, REPLAY, USERS,
))

# -- the tree's README -------------------------------------------------------------------

INTRO = """\
axfs - a language model behind a filesystem

  echo "Once upon a time" > tasks/new      submit a prompt (default parameters)
  cat tasks/latest/stream                  the answer, streamed as it is generated
  mkdir tasks/job; echo "max_tokens 32" > tasks/job/config; echo hi > tasks/job/prompt
                                           a task with its own parameters

"""
ERRORS = """
A bad write fails with an errno (EINVAL, EBUSY, EFBIG, ...); over a limit, with
EDQUOT, EFBIG or E2BIG. The reason is in the task's error file, in trace and in
users/UID. Mounted with --multi-user, a task is its owner's only (0700, listed to
its owner), and trace shows others' lines as counts, without text; root sees all.
"""
PATH_WIDTH = 21
HELP_WIDTH = 68


def _lines(d: Dir, prefix: str) -> Iterator[str]:
    """Each row under ``d``, depth first: its path, then its help wrapped beside it."""
    for row in d.files + d.varying:
        path = prefix + row.name + ("/" if isinstance(row, Dir) else "")
        for i, line in enumerate(textwrap.wrap(row.help, HELP_WIDTH)):
            yield f"{path if i == 0 else '':<{PATH_WIDTH - 1}} {line}\n"
        if isinstance(row, Dir):
            yield from _lines(row, path)


README: bytes = (INTRO + "".join(_lines(ROOT, "")) + ERRORS).encode()
