"""Pushing this node's generation to its downstreams.

- ``link``: :class:`Link`, one downstream's session kept between pushes,
  and its :class:`~syncd.push.link.Channel` (frames both ways, a reader
  thread, a send rate limit);
- ``pusher``: :class:`Pusher`, one push over a link (plan from the
  downstream's generation, pipelined send, commit, cascade), with its
  ``window`` (what is in flight) and ``send`` (how each file goes);
- ``tree``: :func:`push_tree` and :func:`push_with_retries`, every
  downstream at once, retried, with failover to a standby edge (``via``);
- ``result``: :class:`PushResult`, and :func:`filter_rules`.

Every module logs as ``syncd.push``.
"""

from __future__ import annotations

from .link import Link
from .pusher import _CUT, Pusher, _batches
from .result import PushResult, filter_rules
from .send import delta_pays as _delta_pays
from .tree import push_tree, push_with_retries

# _CUT, _batches and _delta_pays: for the tests that take them from here.
__all__ = ["Link", "PushResult", "Pusher", "push_tree", "push_with_retries", "filter_rules",
           "_CUT", "_batches", "_delta_pays"]
