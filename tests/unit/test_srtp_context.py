"""The SRTP contexts the relay uses (libsrtp2 behind ``edge._rtp``) against reference packets.

Vectors: the RFC 3711 default policy (AES_CM_128_HMAC_SHA1_80) reference packet and the
AEAD_AES_128_GCM (RFC 7714) RTP and SRTCP reference packets of libsrtp's own
``srtp_validate`` / ``srtp_validate_gcm``, AES_256_CM_HMAC_SHA1_80 (RFC 6188) from
``srtp_validate_aes_256``. SSRC 0xcafebabe, sequence 0x1234.
"""
from __future__ import annotations

import os

import pytest

from edge._rtp import SRTP_SUITES, SrtpContext, SrtpError

H = bytes.fromhex
PLAIN_RTP = H("800f1234decafbadcafebabe" + "ab" * 16)
PLAIN_RTCP = H("81c8000bcafebabe" + "ab" * 16)

VECTORS = [
    ("AES_CM_128_HMAC_SHA1_80",
     H("e1f97a0d3e018be0d64fa32c06de4139" "0ec675ad498afeebb6960b3aabe6"),
     H("800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb")),
    ("AES_256_CM_HMAC_SHA1_80",
     H("f0f04914b513f2763a1b1fa130f10e2998f6f6e43e4309d1e622a0e332b9f1b6" "3b04803de51ee7c96423ab5b78d2"),
     H("800f1234decafbadcafebabef1d9de17ff251ff1aa007774b0b4b40da08d9d9a5b3a55d8873b")),
    ("AEAD_AES_128_GCM",
     H("000102030405060708090a0b0c0d0e0f" "a0a1a2a3a4a5a6a7a8a9aaab"),
     H("800f1234decafbadcafebabec5002ede04cfdd2eb91159e0880aa06ed2976826f796b201df3131a127e8a392")),
]
GCM_SRTCP = H("81c8000bcafebabec98b8b5df0392a55852b6c21ac8e7025c52c6fbea2b3b446ea31123ba88ce61e80000001")


@pytest.mark.parametrize(("suite", "key", "cipher"), VECTORS, ids=[v[0] for v in VECTORS])
def test_protect_matches_the_reference_packet(suite: str, key: bytes, cipher: bytes) -> None:
    assert SrtpContext(suite, key, inbound=False).protect(PLAIN_RTP) == cipher
    assert SrtpContext(suite, key, inbound=True).unprotect(cipher) == PLAIN_RTP


def test_gcm_srtcp_matches_the_reference_packet() -> None:
    key = VECTORS[2][1]
    assert SrtpContext("AEAD_AES_128_GCM", key, inbound=False).protect_rtcp(PLAIN_RTCP) == GCM_SRTCP
    assert SrtpContext("AEAD_AES_128_GCM", key, inbound=True).unprotect_rtcp(GCM_SRTCP) == PLAIN_RTCP


@pytest.mark.parametrize("suite", sorted(SRTP_SUITES))
def test_a_flipped_bit_fails_authentication(suite: str) -> None:
    key = os.urandom(SRTP_SUITES[suite])
    sealed = bytearray(SrtpContext(suite, key, inbound=False).protect(PLAIN_RTP))
    sealed[15] ^= 0x01
    with pytest.raises(SrtpError) as err:
        SrtpContext(suite, key, inbound=True).unprotect(bytes(sealed))
    assert err.value.reason == "auth"


def test_a_replayed_packet_is_refused() -> None:
    suite, key, cipher = VECTORS[0]
    rx = SrtpContext(suite, key, inbound=True)
    rx.unprotect(cipher)
    with pytest.raises(SrtpError) as err:
        rx.unprotect(cipher)
    assert err.value.reason == "replay"


def test_srtcp_round_trip_and_replay() -> None:
    key = os.urandom(30)
    tx = SrtpContext("AES_CM_128_HMAC_SHA1_80", key, inbound=False)
    rx = SrtpContext("AES_CM_128_HMAC_SHA1_80", key, inbound=True)
    sealed = tx.protect_rtcp(PLAIN_RTCP)
    assert sealed[8:24] != PLAIN_RTCP[8:24]            # the report body is encrypted
    assert rx.unprotect_rtcp(sealed) == PLAIN_RTCP
    with pytest.raises(SrtpError):
        rx.unprotect_rtcp(sealed)


@pytest.mark.parametrize(("suite", "key"), [("AES_CM_128_HMAC_SHA1_80", b"short"), ("NULL_CIPHER", bytes(30))])
def test_bad_keys_and_suites_are_refused(suite: str, key: bytes) -> None:
    with pytest.raises(SrtpError):
        SrtpContext(suite, key, inbound=True)


def test_a_context_does_one_direction() -> None:
    with pytest.raises(SrtpError):
        SrtpContext("AES_CM_128_HMAC_SHA1_80", bytes(30), inbound=True).protect(PLAIN_RTP)


def test_the_relay_links_the_libsrtp2_the_build_made() -> None:
    """tools/build-libsrtp.sh's OpenSSL build when it exists (setup.py links it), else Debian's."""
    from pathlib import Path

    from edge._rtp import srtp_library

    built = (Path(__file__).resolve().parents[2] / "build" / "libsrtp" / "lib" / "libsrtp2.a").exists()
    name = srtp_library()
    assert name.startswith("libsrtp2 2.") and name.endswith(" on openssl" if built else " on debian"), name
