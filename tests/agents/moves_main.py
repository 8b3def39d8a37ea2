"""A hostile agent (issue 12): commits something the gate rejects, then moves the
integration branch to it from its lease's repository and reports, hoping the daemon
finds its work "already merged" and lands it with no gate run."""

from _common import HANDOFF, commit, git, write

write("evil.txt", f"{HANDOFF} was here\n")
commit(f"{HANDOFF}: evil")
git("update-ref", "refs/heads/main", "HEAD")
git("update-ref", "refs/remotes/origin/main", "HEAD")
