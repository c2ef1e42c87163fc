"""syncd.gcm against paramiko's own Packetizer: for a fixed key, IV and padding
source, the channel data packets it builds are paramiko's, byte for byte."""

from __future__ import annotations

import os
import random
import socket
import threading
from unittest import mock

import paramiko
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paramiko.common import cMSG_IGNORE
from paramiko.packet import Packetizer

from syncd import gcm

KEY = bytes(range(32))
IV = bytes.fromhex("00112233445566778899aabb")
# A channel data packet's length field is in the clear: a 1 MiB packet, as
# syncd's MAX_PACKET_SIZE allows, must come out the same too.
SIZES = (0, 1, 2, 15, 16, 17, 31, 32, 33, 1000, 32768, 65539, 1 << 20)


class _Drain:
    """Everything written to one end of a socketpair, read on a thread (a
    packet larger than the socket buffer must not block the writer)."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair()
        self.data = bytearray()
        self._thread = threading.Thread(target=self._read, args=(theirs,), daemon=True)
        self._thread.start()

    def _read(self, sock: socket.socket) -> None:
        with sock:
            while chunk := sock.recv(1 << 20):
                self.data += chunk

    def close(self) -> bytes:
        self.ours.close()
        self._thread.join(30)
        return bytes(self.data)


def outbound(cls: type[Packetizer], drain: _Drain, cipher: str) -> Packetizer:
    """A Packetizer whose outbound cipher is set as paramiko's Transport sets it
    after a key exchange (Transport._activate_outbound) for ``cipher``."""
    info = paramiko.Transport._cipher_info[cipher]
    packetizer = cls(drain.ours)
    packetizer.set_outbound_cipher(block_engine=info["class"](KEY[:info["key-size"]]),
                                   block_size=info["block-size"], mac_engine=None, mac_size=16, mac_key=None,
                                   sdctr=False, etm=False, aead=True, iv_out=IV)
    return packetizer


def state(p: Packetizer) -> tuple:
    return (p._Packetizer__iv_out, p._Packetizer__sequence_number_out, p._Packetizer__sent_bytes,
            p._Packetizer__sent_packets, p.need_rekey())


def ignore(n: int) -> paramiko.Message:
    m = paramiko.Message()
    m.add_byte(cMSG_IGNORE)
    m.add_string(b"i" * n)
    return m


def both_ways(messages: list, cipher: str = "aes128-gcm@openssh.com", rekey_bytes: int | None = None):
    """The bytes and final state of paramiko's Packetizer, then of
    GcmPacketizer, sending ``messages``: (chanid, data) as channel data, an
    int n as an SSH_MSG_IGNORE of n bytes (paramiko's path on both sides).
    Padding comes from one seeded source per side."""
    results = []
    for base in (Packetizer, gcm.GcmPacketizer):
        limits = {"REKEY_BYTES": rekey_bytes} if rekey_bytes else {}
        cls = type("Under" + base.__name__, (base,), limits)
        drain = _Drain()
        source = random.Random(20261207)
        with mock.patch.object(os, "urandom", source.randbytes), \
                mock.patch.object(gcm, "TESTED_PARAMIKO", (paramiko.__version__,)):
            p = outbound(cls, drain, cipher)
            for m in messages:
                if isinstance(m, int):
                    p.send_message(ignore(m))
                elif base is Packetizer:
                    p.send_message(gcm.ChannelData(m[0], memoryview(m[1])).message())
                else:
                    p.send_message(gcm.ChannelData(m[0], memoryview(m[1])))
        results.append((drain.close(), state(p), getattr(p, "fast_packets", None)))
    return results


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"])
def test_channel_data_packets_are_paramikos_byte_for_byte(cipher):
    messages = [(7, random.Random(size).randbytes(size)) for size in SIZES]
    messages.insert(3, 40)  # paramiko's own path between two fast packets: the counters carry over
    (theirs, their_state, _), (ours, our_state, fast) = both_ways(messages, cipher)
    assert fast == len(SIZES)  # every channel data packet was built by syncd.gcm
    assert ours == theirs
    assert our_state == their_state


@given(st.lists(st.one_of(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=3000)),
                          st.integers(0, 100)), max_size=12))
def test_any_mix_of_messages_comes_out_as_paramikos(messages):
    (theirs, their_state, _), (ours, our_state, fast) = both_ways(messages)
    assert fast == sum(not isinstance(m, int) for m in messages)
    assert (ours, our_state) == (theirs, their_state)


def test_a_packet_reaching_paramikos_rekey_limit_asks_for_the_rekey_as_paramiko_does():
    # With paramiko's default limits (syncd's transport raises them), the
    # packet that reaches one goes paramiko's way, and the rekey request
    # comes after the same packet.
    messages = [(1, bytes(3000)) for _ in range(6)]
    for n in range(1, len(messages) + 1):
        (theirs, their_state, _), (ours, our_state, _) = both_ways(messages[:n], rekey_bytes=10000)
        assert (ours, our_state) == (theirs, their_state), n
    assert our_state[-1] is True  # need_rekey: the limit was reached


def test_switch_and_version_gate(monkeypatch):
    assert gcm.KILL_SWITCH == "SYNCD_NO_FAST_GCM"
    monkeypatch.setattr(gcm, "TESTED_PARAMIKO", (paramiko.__version__,))
    for value, on in ((None, True), ("0", True), ("", True), ("1", False), ("yes", False)):
        if value is None:
            monkeypatch.delenv(gcm.KILL_SWITCH, raising=False)
        else:
            monkeypatch.setenv(gcm.KILL_SWITCH, value)
        assert gcm.enabled() is on, value
        a, b = socket.socketpair()
        with a, b:
            assert gcm.GcmPacketizer(a).fast is on
    monkeypatch.delenv(gcm.KILL_SWITCH)
    monkeypatch.setattr(gcm, "TESTED_PARAMIKO", ("0.0.0",))
    assert gcm.enabled() is False


def test_off_it_sends_what_paramiko_sends(monkeypatch):
    """A GcmPacketizer with the fast path off hands channel data to paramiko."""
    monkeypatch.setenv(gcm.KILL_SWITCH, "1")
    messages = [(3, os.urandom(100)), (3, os.urandom(5000))]
    drain = _Drain()
    p = outbound(gcm.GcmPacketizer, drain, "aes128-gcm@openssh.com")
    assert not p.fast
    for chanid, data in messages:
        p.send_message(gcm.ChannelData(chanid, memoryview(data)))
    drain.close()
    assert p.fast_packets == 0 and p._Packetizer__sent_packets == 2


def test_the_installed_paramiko_is_one_it_was_tested_on():
    """CI installs paramiko releases from TESTED_PARAMIKO only (scripts/test.sh):
    an untested one would silently leave the fast path."""
    if os.environ.get("SYNCD_UNTESTED_PARAMIKO_OK"):
        pytest.skip("SYNCD_UNTESTED_PARAMIKO_OK is set")
    assert paramiko.__version__ in gcm.TESTED_PARAMIKO
