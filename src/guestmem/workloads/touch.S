# touch: first-touch population of a slice of guest memory (64-bit; CPL3 where possible).
#
# Entry: RDI = vCPU index, RSI = slice base GPA, RDX = slice size.
# Writes the page's own address into the first qword of every 4 KiB page, and reports each
# finished 2 MiB chunk with PORT_SYNC op 1 (RDI = address reached).
    mov r12, rsi
    lea r13, [rsi + rdx]
next_chunk:
    lea r15, [r12 + 0x200000]
    cmp r15, r13
    cmova r15, r13
touch_page:
    mov [r12], r12
    add r12, 0x1000
    cmp r12, r15
    jb touch_page
    mov rdi, r12
    mov eax, 1
    out 0xf5, eax
    cmp r12, r13
    jb next_chunk
    xor eax, eax
    out 0xf4, eax
