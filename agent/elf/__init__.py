"""ELF files and the files processes map, for every stage that reads binaries (symbolize/,
unwind/, python/):

    mapped_files.open_mapped_file(pid, mapping) -> OpenedBinary   the file a process maps,
        as it sees it, verified by dev + inode (deleted, replaced, in a container)
    reader.ElfInfo.read(path)                    build id, PT_LOADs, debuglink, function
        symbols (with plt.py's PLT stubs), bounded against crafted files
    reader.runtime_to_elf_vaddr(address, mapping, loads)   runtime address -> ELF vaddr
"""
