"""Real device payloads for the vmstate decoder's unit tests (no tests in this module).

Recorded from QEMU 7.2.22 under TCG: the dirtier test guest (64 MiB, ``dirtier_spec``
defaults) migrated twice with ``migrate exec:cat > FILE`` (``cont`` in between, 0.5 s
apart), so both streams share one vmdesc and every device section appears in two states.
Layout (zlib, then base64): be32 length + vmdesc JSON, then for stream A and stream B
be32 length + the device region (SECTION_FULL sections with footers, as in the stream).

Regenerate from two recordings with ``python tests/unit/test_vmstate_payloads.py A B``.
"""

from __future__ import annotations

import base64
import sys
import zlib
from functools import cache

from qmpshadow.migstream.events import DeviceSection

_BLOB = """
eNrtnVuMG9d5x7m70lqWFHvlS+w4viyUxkgAS0tyKXmlvqRxIVgojAo1jLpN3fFw5pA72blpZkjt5uIKRZAALdCXoijg9jlA
HKDxY4ECrZO89K1o39qiQB760gAFWiAPhRFEPd83Q3I4HHLmI1eKs/ofaLVLzvnOnPM/t9+5zTTWvtX/+sXQ7Csjdr6mLl7f
7jSvXX1l+6Ktho6lYv3FV75+0Tc9unQxcTwVXdRXHT9OTN9ShmPr75v6m6EX28aMv6GKYifw9Xdt/annKNcuBGmFAyNxrIPY
CHq9WCVklRyFfM3xk6sd+iKL2t43X9meWA78QazsvP/0G6M76PXS25fa0R0tN7AOat3xnVnbwPN0kqpVmPY8kaI1R4p9000K
CdLx2W3n4tOZio2+qqJoECZGpG4PVJxU2M6kpV4iCrGfl5PKH16OVD8m72YUmUeGq9jgaiFWC/KUwlBOeFFo0XPN9L4Co/1S
owVqk1EvHFhFk9bVnEm7zCQ2tKSJmSixaWL2l7alvDB6QeSZyUphFPNzLxdInEQDi4td9td1HcRU+eEwpktQc04BSrypjM8+
zoZmjK7UCdHwTD8RFA0yUYdhhVLvTD60mlyvch+LMsYlIl4ViahD8FSajOpmJFauspIgEhTtrhkrgUau4zmJIPg6NS2vYXtW
Q9eeuiEkq5YsiaCYTLE+CplUMgeSSSWLj2JF4GZYUvoYW6pYikgTUzFdWdFXmu/IbdpL2OwuYdOR2tjRIqKpEYDZbmqqiA8K
A4eKzPMOrTgSZvih5xmEYFkGzKXq6mqXhVSv2hm3jd9/443fUX1Zxk/MWlVmU8R0tQToVSQt4IkpNXGXsLGWsOkVC0sNmwMV
+crtx8LmjJXwyowqSlpoJkuNn9rC+ww9Yz82h9I0abOhZ3WFVklslYzxaxjywNpS4dJ2hhXp6mbawgHXlP2dyBGP2CYB2CtG
wF41AuqQfumGRtrLDY0knKliezmT1mzbmkSR0XMO09mTqWayJctBDslWPTZZwnRoRquNl/OhVLfUwuahRkNU0TJPppwc/6ua
zabnq2r0gqFROhNRYaZrsnROaFT8DD+SRTEOepS6LJ2yguh7Tqkw9SxD5duO35cZ7puxoaMaaJ4MbCWzjZ3QMYZSxOZ8tPqG
ZUpRkqwo+wfxEoZW4oqtlNE1/YOZ2ZdOU96RmINDOXMnyjNoMtzwYik13DFdN5unlhsfWlFTasL10ugOpXYjRm2tyqhHnre/
DKS2l4PUXSGk8pzfoBvr6sK9GsemOFe+EwaUbYGfRIE7yrjqxDCClVhWxK7k/trQiHVbYgWDuqNsripFs4V3nl5IOBh6l3SX
fSlIW8uKBYWC7+roRYE322dUlyZ9n6EZOtalPq2MXNKh1LvdsstKQ9O2Ja2oxpUBd4ZRIrbS/YTAhmUwpPFLrfiSwIjWvOJ9
pydJk+ZUl5jPEMZwEC5ZIvZN33Z1Qag7CZWUEemCiGUWhjIPBVb9yX0WTU5Uh0CFyjoQTFJ1poPxoOux6TrVh7QLyRGC8LL1
ZNyALtkGhEvfr47ldF9CN6zRiYy8TUrZ7pxSRj6F8yGOAN3NqGtI/IuGtnE4iJyAlo+VJYi/G/T1EDYWDF3It+GJhg9OvEqN
SrxVrJ1oFWt3mCxaja0a/IgmcR1rJqbt+ta2M3RsRUzYE9yTEW62E67aSuIkjumW819dO8MNTJvHO/V38fjqMBGa8O4iWqR3
oiPJ5p3eHcPq9Wu0LhOPNfYvDXRUNLMfCSbKyCadlyyZKS82j5WjjjS2O7Zn1tsUoT2W9iDV44vsTqYVOoZXc2STmF1XD3+j
UpJcuDDnH+hclhtGsR3WNCsOZG69dvP1IK4ziMn5rJaA6q/TH41sa3eF+h5ffuvNepHJPFbHxXei2zOtwra6PTDdBc3t7Um7
MDWNsrB5mU5NU7vr/O9yc+dmp9O88XaNpE08Vvf0oRnpimgE3a/K8FXL95u82bFehc98FHr9VEdXLWiVqRAUFtRCy9lOL+Tb
iitXZ+SfQUWy1Be2xxdy8xT55edXry65Z7JVyL+seanIr5lGaH6d8DzTF4BT2dT1fN891wmNnhuEAgYS9phlW+M6ooJHDfEo
lBo1N7izCCXq7YpYBCILOiwZGtJuYpnvfUE2lQzBFkxyV5WAqfHZq3XKfAtlHmX+5Jb5cT/d0v30rZs3396tQyAjf9W9tK2G
6J7ndc/azKDwXDVU7tSu8WWxy9lrX7lWIwfH/qorpWvGiZENwWvOFYg8e5F4FqJmrYucIHKSIxr9SCJ/2yibQJpvQfsuqJEz
0u2LgggGriuZHVIWDb1lvQQN2MuX4BdMcg2SwFCBI5Ag4Pk/XQ/ltqN09Qaue2T4Kk40nwonp3QiO4I7On6fBqmy9XPXiqrb
2cqa2EJNRE1ETXygNTGoucow8VjNNZJFAF34NQIrQQlbdlG6pL4vmszV8bKTrjtDzZ06U4XjY4yhqjOFNvJWY4p1jGA1pwAd
0X4Zikg6vyXadOwP0q09USxY/Rmdi82ruyvCYY5tyfnaufOvfv3oiYW2PMkOsF4s2cAbKt1J2AKDO5FJ419TsH/utvIGEzHH
Bw9HX5TuBOq0C+Xds1qdq3utvSip06YUfFc3LJYXxIZtJmY+irPTde1izmgrx7fVobSRKe75n9POtMtyy7HqqDmz/DNlLD0A
XlxCmRffsjlt01WxJTpyXV4qK2YhjCyz6y59ENYNQruEDBZYiY/P8w2Wyi/TNSNvJrMqOwYi207NsWinZuXYN31fD5V1ob1M
WWo7Ma03STJoFMRqzXLoJNtZSHU7tcJCa8WitZlY+7pcl67PLlpqTNdlU2sBh/Em3WXthIAuZGA+lrCcEadHELs7QhKV+e5a
AmX7ouSuuBwfmX7s8Ob5aut837jbLq1aVDuXCzg/NRaHBzUaj7G/ajSiTtUIBHxkDzzvSI8ne5GK99O92ZJxR6z7jnSZtSIN
E4/VLeASO2MlwadbUCJBixN1JbMGSuLZEXiuHBNOI5wkZMlMhyfxHEui0bOieY/1WDDdXyyTPbsOtGa+qnu1JUpj/bAjUyBl
1BXU66CmlFNjOTuSLLTdtzLDPW5TatCSGrQFJdPpBUWautJqC5a7dLscBpJzg2xCdxKaCPOcbWxJM6SCRDg90BT6b0mmXZUV
eKHuhg9WnRRY0DwGksXK8E4kgCCac6EV7tBRs5A5s4upkHeRM0yt0mFx2sxJ2ikKoOaTvEpO3i7Ixki0vhtXzmTX2DPIidnx
lO2YRpTVgep0Tftf1OVMr3JWZEQLGfGgMiL/8cq13SJkx+2Drl2Hssce7+O+vDfb26/x4/O230xmlJl3t3SgZ3mCc8m3B2qg
LkdhEklt7ixhIxz4p0aV83+0K2E6q9sFtDR9Q/kzkyMV2/RpvOYWSlnFGR19IzqIbMxORi3cqKBLlBcM0sW96sI39lqNjSh+
n4Dix/llSGeHUis92A7cATWgUsvY9EJX1WgmZ01pMUFqU/bMiCobWyW6c5ByaGZ7WD8fM4sjscXXpBbdQZKUPPRj0cRIaNXs
dazanU7mUTCBWz/s0jp+vPOiws2H6XMjjMQLV+URlmFHHSY6SJWbmq0+VuI5fV3RaGpP+mDVoBtHlsh/sT2qGMHU8D8NSp1m
oYQOvbqdU85ntWbcus6cVKlzJoMtZ5630JxZqV8go981xqHUnNsrL8YLDMwut91K1BoEUXKtXac5GHusBuZgkJB3STxyO2Fb
O45dJ/MzXzirchybYbveeP/9MuN1nRfb4yDqLLNLNuaP2zqaTzETMdkIT1RP7hepJDoyYn5kj+EPvPorO8Uw/Fj63J9iCAPf
SQRTz9cW524LuXuCcncQr1RzjSyAGodqJDkrS1N7UZJaJyNJvHGit2JmlUzIzauI3sBNsgIeC06n27q3dHpH1ZMKU+sQSlfb
SLKRlB6jJpiNFtexcoNFi5hHgk2i+zLfQdcQK0RG0kSQjb+MkStOj0wB6aZwaTfgds3OniQ6WiXjQB0JOprZxyIuGAbZ9GAW
2pPRr9rSM9Vk7NVoM1poM9BmoM1AmzG3zWiBM9BmoM1Am7FSmwHOQJuBNgNtxqTNKBwxaVvGeKJm8VT9xGeNR5WaQ2XzQ9NU
HC+5hrC7EzrOYccIvTpLGzmvWE04jtUEM7oceq3LaphcjhPREtbEcHZ/abWd5Sf0IzEMPVk2/satN8q2qLTmPhHVE9RM7Tte
dn4x9rrCRXgvM6lRJb0ulw1BG6YtSt4hUGEgWuXXBmVz/4staHG6KTdpyUxKz4IuwoHsNjPH4toyOQaHYs277oFsgZ/a8nRv
29QmpSCYvxs4CA078Ov7d3SzRz0Gv4+h+GKdhZb8hPf05JPJ2y7oWQzZ+brKgKY2JewV25fE0z+y85uZVaArWM8N7ghPh2nr
fig835EZ1KjRoma5si2ekm46FfT8UnrU0n6QhO6gfzn7PecpIQsqyUxIoy/2Q/56QmXLTXrMDa7GawxCyVmI4I4veK753ooi
tCDC9KPoHloRdiGC9AmKJ1SEKxBB+lbwEyrCqxBB+tLAEyrCNYhAm3qhQuE9ng+vCoBGijOokeIMbKQ4gxvlL9o8qSqAHCnO
QEfejw4Vrm+3wY6kAtiRVAA7kgpgx+IDnR9eFcCOpALYkbeLQAXaTwUVtApgR1qaAzuSCmDH4qafh1cFsCOpAHYkFcCOpALY
kVQAO5IKYEdSAezIz8+CCjo0sCO/Lwkq6NDAjhQa2JFCAztSaGBHCg3syEdboIIODexIG8HBjvy+FKigVQA7kgpgR1IB7Egq
gB1JBbAjqQB2JBXAjvwuH6hwffsq2JFUADuSCmBHUgHsSCqAHUkFsCOpAHYkFcCOpALYkVQAO9JjB8COpALYkVQAO5IKYEdS
AexIKoAdSQWwI6kAdiQVwI6kAtiR7MGOZA92JHuwI9mDHcke7Ej2YEeyBzuSPdiR7MGOZA92pIdcgh1JBbAjqQB2JBXAjqQC
2JFUADuSCmBHUgHsSCqAHUkFsCM/GxzwyDKAHlkG4CPLAH5kGQCQLAMIkmUAQrIMYEiWARDJMoAi+d0qoEiWARTJMoAiWQZQ
JMsAimQZQJEsAyiSZQBFsgygSJYBFMnvpgNFsgygSJYBFMkygCJZBlAkywCKZBlAkSwDKJJlAEWyDKBIfrcvKJJlAEWyDKBI
lgEUyTKAIlkGUCTLAIpkGUCRLAMokmUARVKc8QKaVAZQJMsAimQZQJEsAyiSZQBFsgygSJYBFMkygCJZBlAkxRmvokllAEWy
DKBIlgEUyTKAIlkGUCTLAIpkGUCRLAMokmUARVKc8VKaVAZQJMsAimQZQJEsAyiSZQBFsgygSJYBFMkygCJZBlAkxRmvp0ll
AEWyDKBIlgEUyTKAIlkGUCTLAIpkGUCRLAMokmUARVKc8aKaVAZQJMsAimQZQJEsAyiSZQBFsgygSJYBFMkygCJZBlAkxRmv
rEllAEWyDKBIlgEUyTKAIlkGUCTLAIpkGUCRLAMokmUARWqTNt5dk8oAimQZQJEsAyiSZQBFsgygSJYBFMkygCJZBlAkywCK
JBnw7ppUBlAkywCKZBlAkSwDKJJlAEWyDKBIlgEUyTKAIlkGUCTJgHfXpDKAIlkGUCTLAIpkGUCRLAMokmUARbIMoEiWARTJ
MoAiSQa8uyaVARTJMoAiWQZQJMsAimQZQJEsAyiSZQBFsgygSJYBFEky4N01qQygSJYBFMkygCJZBlAkywCKZBlAkSwDKJJl
AEWyDKBIkgHvrkllAEWyDKBIlgEUyTKAIlmGh4Yi0yRXhEkfBt1YWYlOTJaAKQFCxznsGKG34ylvP6yXcr699h9ER6MoXRSp
ntpuZ7bbpLqqd+tYuTotQSTQkj69M6tnd+C4dlp09P19SxmOrS9SDztbQsaeq2MYmom1r+xiBPdy8WsV4tN3g67pjlWoiFDB
dw3N6K71i2o08MeBj0y6g15PRfkkNJssa6PR/saphnanE8dTUSN16/Tf7ybv/WUj5z7341/vvUd/kP9TZ61wYFiB5wV+dn1t
ZEyeTpGn0xvaU/btefrvR9/9j7/LB/mj7770wpT11t/8X/r7B7dGPrLrX2och9s6/+/ZXzf0z4cbf9S4X25r9Mc97Rr/9Of0
55np796f52+V73JOf9f445Lv/jQXy+fe1f8/Mx3zD7fJY0X6LhynWPfuPf4/6V+n0rQ0XrrbgJO5s/rnkVOb/NNYWxPZbhbc
6PvTK7qs7nN4WY7euzupBw/MpYVq/ue1xtrZ/LW8WxQmrt+7t2SWrKHGZnXsKd1L7oSB6+r+1E+iwDW8OMordPoC+dBfGrHn
aE8DP8ldXqP+9jT1t5vnDobepSSMLgVh8gmReX3q0/kz2xTbzVPcVpmhY2UXNn7xk0ezCN9rPH7fY7WW+2l8R/98a6LU+Rtb
dZoTcu9xMqhn3+zdMaxef5xoak1OnT6bfrtje+ZUjj+WfZ+C+CSv12fo4Sm6xRm6xaOP3Hrt5utBPM5Y3Z7+AV19lK6e3dRX
v/zWm7n0nSrGmjyfpW/PPdnU7jr/u9zcudnpNG+8PcoIisa37776xMYax2ezSoufPVebBc40ti6Q2y3vvD7BjqQ7R9Kd35jk
5Vrj3rHe4Dzd4FPZDdLS+YuZKvzRCjf4FN3gsSfGmd/SmX/r5s23d6fzvhHqvNdZv7Y57rSXzPs3OMhCTp89dy5f2NM7nD+/
XrsQpe7xX2JReIyEfPy0s9e+cm1UGNYu/O0kcmupv8fJ39bYX9bi/FmjEY79nSd/W+TvwqYT5FvEBX3mr+BvSuYFSuYTp/ZD
lZT2Djm3MRpoNudixujCWm2f67V9vscR1f89ec6zWp2re629KBnnzK81Xm0821j/3IWXX14f1ZDNu+uNn89Lzc+3OUVN+vuJ
B4C6Uiw7OPWd/3z2px99439/759fH32nP3/zlZ/91evP/vRfnvnrf/uv10mSJ0mSp7g8d6aK6SijNzYaG+vpp3P3fvwX9Pvl
5rf/cKoJ2yhjksvvZ/bvb2ShPfm9d27lfVA4FIenKA5Pnw6tODwYF68tuvI0Xfn0Zqwix3TzN/vhxsa7HzZ+SH4+TX6e2ejZ
o8xc/9JH56uaObiHyGWF8920cTp9oWdHzlDteMp2TCMyEzXyM+8SFbNnqJg9uxnG7YOuPSqKKwyWTqD7+OMcg/Oc4bMk2mfO
aNG8YBCrUQWFbLWY5DOk3nO6XcyVuMbzph5e8lc76jBRvq1sXiNR+QL/Mds/R/affWTo5cUvG0bAwcHBwcHBwcHBwcHBwcGd
SHfvHk8RfJbmAp7fDIMoudbOLq3x1M3zdOWFrdzKUmvHsUezCNm60la4sXZ3vXG3fG/K2keTv0vXle4+lLO0azw/NlmRfusD
nRkfvNVofDiaHT/2a5ShL1CGvviI07aM7iAexYXXRV6kSy89ncvr3Z3RLtTpDH/yNmX4RuOueBH50bV0+XGOW8+i/26jMX8z
UbGUrT2yal48umpWCt0626y4zwYODg4ODg7uhLnTj02f/xlRBnHaS8RpXzg7Of8ywhDeMPoFuvrFc7nDKDlKORMNfN/x+/c1
7hSLLy44f/L9w3/8+7z/Gy/+SbLi+ZMxRn3+t39rKi6jz1s/SPdBbn3IdPzB9/7hJ8ea5q1nLmV/0dEanD/B+ZOT43D+ZFEB
w/mTB339uEfjJ5YhcP4E509w/uQT7XD+ZKm8x/mTBs6fNE7c+ZPP586fbGU15ASeP0nPnax6/uTGfx/963GcP6FwcP4E7kGg
YQPnT+67w/mT42USnD+Bg4ODg4ODg4ODg4ODg4NbxeH8yS/N4fxJicP5Ezg4ODg4OLiH1v3Knz/5f/KrvOc=
"""


@cache
def _raw() -> tuple[bytes, bytes, bytes]:
    raw = zlib.decompress(base64.b64decode(_BLOB))
    parts = []
    pos = 0
    for _ in range(3):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        parts.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return parts[0], parts[1], parts[2]


def vmdesc_json() -> bytes:
    """The vmdesc JSON of both recordings."""
    return _raw()[0]


def device_region(which: str) -> bytes:
    """The device sections of stream ``"a"`` or ``"b"`` as they were on the wire."""
    return _raw()[1] if which == "a" else _raw()[2]


def device_sections(which: str) -> list[DeviceSection]:
    """The device sections of stream ``"a"`` or ``"b"``, split like the parser does."""
    from qmpshadow.migstream.parser import _split_devices

    out = _split_devices(device_region(which), None)
    if out is None:
        raise ValueError("fixture device region does not split")
    return out


def _regenerate(a: str, b: str) -> str:  # pragma: no cover - maintenance tool
    import textwrap

    from qmpshadow.migstream import StreamParser
    from qmpshadow.migstream.events import VmDescription
    from qmpshadow.migstream.writer import device_section_bytes

    def load(path: str) -> tuple[bytes, bytes]:
        parser = StreamParser()
        with open(path, "rb") as f:
            parser.receive_data(f.read())
        parser.receive_data(b"")
        events = parser.events()
        vd = next(e for e in events if isinstance(e, VmDescription)).json_bytes
        devs = b"".join(device_section_bytes(e) for e in events
                        if isinstance(e, DeviceSection))
        return vd, devs

    va, da = load(a)
    vb, db = load(b)
    if va != vb:
        raise SystemExit("the two recordings have different vmdescs; record them from one VM")
    raw = b"".join(len(x).to_bytes(4, "big") + x for x in (va, da, db))
    return "\n".join(textwrap.wrap(base64.b64encode(zlib.compress(raw, 9)).decode(), 96))


if __name__ == "__main__":  # pragma: no cover
    print(_regenerate(sys.argv[1], sys.argv[2]))
