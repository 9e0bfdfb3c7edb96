#!/usr/bin/env python3
"""Breaks, one at a time, each piece of delivery logic in
server/src/feed/writer.rs and runs the writer's unit tests: every mutation
must make at least one test fail, or that logic has no test guarding it.
Restores the file afterwards. Takes a few minutes (one build per mutation),
so it is not part of .ci/run; run it from the repository root after changing
the writer:

    python3 .ci/feed_mutations.py
"""
import re
import subprocess
import sys

PATH = "server/src/feed/writer.rs"
orig = open(PATH).read()
lines = orig.split("\n")


def at(pattern, nth=0):
    """Index of the nth line containing `pattern`."""
    found = [i for i, line in enumerate(lines) if pattern in line]
    if len(found) <= nth:
        sys.exit(f"{PATH} no longer has {pattern!r}: update this script")
    return found[nth]


def replace(i, new):
    return lambda ls: ls[:i] + [new] + ls[i + 1 :]


MUTATIONS = {
    "drop duplicates at or below the cursor": replace(at("if ev.seq <= *cur {", 0), "if false {"),
    "fill a gap from the log": replace(at("if ev.seq > *cur + 1 {"), "if false {"),
    "send edits only for posts the follower has": replace(at("if ev.seq <= *cur {", 1), "if true {"),
    "re-send edits and deletes lost on overflow": replace(
        at("for (ch, from) in self.outbox.take_changes_lost() {"),
        "for (ch, from) in Vec::<(ChannelId, u64)>::new() {",
    ),
    "catch a lagged channel up to the head": replace(
        at("for ch in lagged.drain(..) {"), "for ch in lagged.drain(..).filter(|_| false) {"
    ),
    "Reset on another epoch": replace(at("let epoch_changed ="), "let epoch_changed = false;"),
    "Reset on a position ahead of the head": replace(
        at("let ahead = after > info.head_seq;"), "let ahead = false;"
    ),
    "Reset when everything missed was trimmed": replace(
        at("if let Some(info) = self.log.channel(ch) {"),
        "if let Some(info) = self.log.channel(ch).filter(|_| false) {",
    ),
    "Reset when the catch-up finds a hole": replace(at("if first.seq > cur + 1 {"), "if false {"),
    "leave promoted posts to the task (durable count first)": replace(
        at("EventKind::Promoted if live =>"),
        "EventKind::Promoted if live && false => return Step::Promoted,",
    ),
}

unguarded = []
try:
    for name, mutate in MUTATIONS.items():
        open(PATH, "w").write("\n".join(mutate(lines)))
        run = subprocess.run(
            "cargo test -q -p herald-server --lib feed:: 2>&1",
            shell=True,
            capture_output=True,
            text=True,
        )
        if "could not compile" in run.stdout:
            print(f"{name}: the mutation does not compile; update this script", flush=True)
            unguarded.append(name)
            continue
        failed = [t.split("::")[-1] for t in re.findall(r"^    (feed::tests::\S+)$", run.stdout, re.M)]
        print(f"{name}: caught by {failed}", flush=True)
        if not failed:
            unguarded.append(name)
finally:
    open(PATH, "w").write(orig)
if unguarded:
    sys.exit(f"no test fails without: {unguarded}")
print("every piece of the writer's delivery logic is guarded by a test")
