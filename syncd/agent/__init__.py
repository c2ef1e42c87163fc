"""The remote end of a push: ``syncd agent``, speaking the protocol on stdin/stdout.

The package's modules, each owning its state:

- ``session``: the loop, the dispatch of each message, the state lock, the
  commit's order, the cascade;
- ``plan``: deciding each row of a push, the deletion walk, a basis for new
  files, the hard-link groups as this edge will publish them;
- ``signatures``: the block signatures of the edge's old copies;
- ``receive``: the files' streams, the staging threads, the answers for each
  file, the resume offers;
- ``staged``: this agent's side of the staging directory (names, what is
  staged, its durability);
- ``early``: what goes live before the commit (new directories, new data files);
- ``gate``: the verification before publishing;
- ``publish``: the publish order, hard links, parking, the manifest's
  record, a generation held back;
- ``touched``: the directories changed since the last commit;
- ``policy``: what this edge accepts of a push;
- ``wire``: the frame writer every thread answers on.

Every module logs as ``syncd.agent``, the name the agent always logged as.
"""

from .session import FEATURES, Agent, serve_stdio

__all__ = ["FEATURES", "Agent", "serve_stdio"]
