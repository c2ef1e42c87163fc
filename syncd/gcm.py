"""The one-copy path for SSH channel data under AES-GCM: the only code that
touches paramiko's private state.

paramiko's ``Channel.send`` copies each packet six times on its way
(Message, asbytes, the header, the padding, the slice to encrypt, the length
prefix); the pusher is the busiest thread of an initial copy, and this path
builds each packet with one copy (docs/performance.md, "Sending channel
data").  To do it, it reads and writes name-mangled attributes of paramiko's
``Packetizer`` (the AES-GCM invocation counter among them) and calls private
methods of ``Channel`` and ``Transport``.

So it runs only where it was tested: the paramiko releases in
TESTED_PARAMIKO, with the environment variable SYNCD_NO_FAST_GCM unset (or
"0"), on a Packetizer that has every attribute used here.  Anywhere else
syncd sends through paramiko's public ``Channel.send``.  tests/test_gcm.py
checks that, for a fixed key, IV and padding, the packets built here are
byte for byte those paramiko builds, counters and rekey trigger included.

Only syncd.transport imports this module.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_DATA, cMSG_CHANNEL_DATA
from paramiko.packet import Packetizer

#: paramiko releases this path was checked on (tests/test_gcm.py and
#: tests/test_transport.py passed with each).  paramiko 3.4 has no AES-GCM.
TESTED_PARAMIKO = ("3.5.0", "3.5.1", "4.0.0", "5.0.0", "5.0.1", "5.1.0")
#: Set to anything but "" or "0": paramiko's own path, whatever the version.
KILL_SWITCH = "SYNCD_NO_FAST_GCM"

_GCM_HEAD = struct.Struct(">IBBII")  # packet length, padding length, message 94, channel, data length
_GCM_BLOCK = 16
_GCM_TAG = 16


def enabled() -> bool:
    """Whether new transports may build channel data here: a tested paramiko, no kill switch."""
    return paramiko.__version__ in TESTED_PARAMIKO and os.environ.get(KILL_SWITCH, "") in ("", "0")


class ChannelData:
    """One SSH_MSG_CHANNEL_DATA packet's content, for :meth:`GcmPacketizer.send_message`."""

    __slots__ = ("chanid", "data")

    def __init__(self, chanid: int, data: memoryview) -> None:
        self.chanid = chanid
        self.data = data

    def message(self) -> paramiko.Message:
        """The same packet as paramiko builds it (``Channel.send``)."""
        m = paramiko.Message()
        m.add_byte(cMSG_CHANNEL_DATA)
        m.add_int(self.chanid)
        m.add_string(bytes(self.data))
        return m


class GcmPacketizer(Packetizer):
    """paramiko's Packetizer, building channel data under AES-GCM itself.

    Everything else (another cipher, compression, packet dumps, every other
    message, a packet that reaches a rekey limit) goes through paramiko
    unchanged.  The packet is what paramiko's own code sends (RFC 5647): the
    length as associated data, random padding to the 16-byte block, the
    sequence number and the invocation counter advanced under the same write
    lock, the same byte and packet counts.  It is sent from
    ``Transport._send_user_message``, under the lock that holds back a key
    exchange, so a rekey never changes the keys between two of its steps.
    """

    _USED = ("write_lock", "block_engine_out", "aead_out", "block_size_out", "compress_engine_out",
             "dump_packets", "iv_out", "sequence_number_out", "sent_bytes", "sent_packets", "socket",
             "keepalive_last")
    #: Channel data packets built here (the rest went through paramiko's own path).
    fast_packets = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast = enabled() and all(hasattr(self, "_Packetizer__" + name) for name in self._USED)

    @property
    def fast(self) -> bool:
        """Channel data may be handed here (:func:`send_channel_data`)."""
        return self._fast

    def _plain_gcm_out(self) -> bool:
        """Outbound AES-GCM, no compression, no packet dumps.  Read outside
        the write lock: only a key exchange changes these, and none starts
        while ``_send_user_message`` holds its lock."""
        return (self._fast and self._Packetizer__aead_out and self._Packetizer__block_size_out == _GCM_BLOCK
                and self._Packetizer__compress_engine_out is None and not self._Packetizer__dump_packets)

    def _reaches_rekey_limit(self, size: int) -> bool:
        # paramiko asks for a rekey after the packet that reaches a limit:
        # that packet goes its way, so the request is made as it makes it.
        return (self._Packetizer__sent_packets + 1 >= self.REKEY_PACKETS
                or self._Packetizer__sent_bytes + size >= self.REKEY_BYTES)

    def send_message(self, data: Any) -> None:
        if type(data) is not ChannelData:
            return super().send_message(data)
        piece = data.data
        n = len(piece)
        # 1 + 4 + 4 + n bytes of payload, the padding length byte, at least 4
        # bytes of padding: a multiple of the block without the 4-byte
        # length (as in paramiko's _build_packet).
        padding = 3 + _GCM_BLOCK - ((n + 9 + 4) % _GCM_BLOCK)
        if not self._plain_gcm_out() or self._reaches_rekey_limit(4 + n + 10 + padding + _GCM_TAG):
            return super().send_message(data.message())
        head = _GCM_HEAD.pack(n + 10 + padding, padding, MSG_CHANNEL_DATA, data.chanid, n)
        with self._Packetizer__write_lock:
            iv = self._Packetizer__iv_out
            sealed = self._Packetizer__block_engine_out.encrypt(
                iv, b"".join((head[4:], piece, os.urandom(padding))), head[:4])
            self._Packetizer__iv_out = iv[:4] + (int.from_bytes(iv[4:], "big") + 1).to_bytes(8, "big")
            self._Packetizer__sequence_number_out = (self._Packetizer__sequence_number_out + 1) & 0xFFFFFFFF
            self._send_parts(head[:4], sealed)
            self._Packetizer__sent_bytes += 4 + len(sealed)
            self._Packetizer__sent_packets += 1
            self.fast_packets += 1

    def _send_parts(self, length: bytes, sealed: bytes) -> None:
        """``length + sealed`` to the socket, without joining them if it takes both at once."""
        self._Packetizer__keepalive_last = time.time()
        try:
            sent = self._Packetizer__socket.sendmsg((length, sealed))
        except (socket.timeout, BlockingIOError, InterruptedError):
            sent = 0  # a full send buffer: write_all waits as paramiko does
        except OSError:
            raise EOFError() from None  # as write_all: the transport is gone
        if sent < 4 + len(sealed):
            self.write_all(memoryview(length + sealed)[sent:])


def send_channel_data(transport: paramiko.Transport, channel: paramiko.Channel, view: memoryview) -> int:
    """What ``Channel.send`` does, one packet of ``view`` (as much as the
    window and the packet size allow), built by :class:`GcmPacketizer`;
    the bytes sent, 0 once the channel has ended.  Only for a transport
    whose packetizer is a GcmPacketizer with ``fast`` set."""
    with channel.lock:
        if channel.closed:
            raise OSError("Socket is closed")
        size = channel._wait_for_send_window(len(view))
    if size:
        transport._send_user_message(ChannelData(channel.remote_chanid, view[:size]))
    return size
