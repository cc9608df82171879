"""Read the undefined symbols that the build must define, from an ELF object file.

Every ``extern __shared__`` array of a kernel compiles to an undefined thread-local symbol
(``__shared__`` is ``thread_local`` in the emulation), plus a weak reference to its C++
thread-local init function (``_ZTH<name>``), which g++ may call without checking for null
inside templates.  The build defines all the arrays at one address, the dynamic
shared-memory buffer, and the init functions as empty; this module finds their names,
mangled as the compiler emitted them, without needing binutils.
"""

from __future__ import annotations

import struct
from pathlib import Path

_SHT_SYMTAB = 2
_STT_TLS = 6
_SHN_UNDEF = 0


def undefined_symbols(path: str | Path) -> tuple[list[str], list[str]]:
    """The undefined thread-local variables and init functions of an ELF object.

    Parameters
    ----------
    path : str or Path
        A 64-bit little-endian relocatable object (``.o``) produced by the compiler.

    Returns
    -------
    (list of str, list of str)
        Names of undefined thread-local symbols, and of undefined ``_ZTH*`` thread-local
        init functions, each in symbol-table order without duplicates.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF object")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [_section(data, shoff + i * shentsize) for i in range(shnum)]
    variables: list[str] = []
    init_functions: list[str] = []
    for kind, offset, size, link, entsize in sections:
        if kind != _SHT_SYMTAB or entsize == 0:
            continue
        strtab_offset = sections[link][1]
        for entry in range(offset, offset + size, entsize):
            st_name, st_info, _st_other, st_shndx = struct.unpack_from("<IBBH", data, entry)
            if st_shndx != _SHN_UNDEF or st_name == 0:
                continue
            end = data.index(b"\0", strtab_offset + st_name)
            name = data[strtab_offset + st_name : end].decode("ascii")
            if st_info & 0xF == _STT_TLS:
                target = variables
            elif name.startswith("_ZTH"):
                target = init_functions
            else:
                continue
            if name not in target:
                target.append(name)
    return variables, init_functions


def _section(data: bytes, at: int) -> tuple[int, int, int, int, int]:
    """(type, offset, size, link, entsize) of the section header at byte `at`."""
    _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
        "<IIQQQQIIQQ", data, at
    )
    return kind, offset, size, link, entsize
