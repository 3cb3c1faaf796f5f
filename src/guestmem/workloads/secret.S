# secret: vCPU 0 converts a range to private and writes a secret there (64-bit, CPL0).
#
# Entry: RDI = vCPU index, RSI = secret GPA, RDX = seed, RCX = secret size (bytes).
# The secret is a xorshift64 stream from the seed, so it exists nowhere but in the guest's
# private memory. PORT_SYNC ops: 1 secret written (the host probes now), 2 the guest still
# reads its secret afterwards, 3 it does not, 4 MAP_GPA_RANGE failed (RSI = ret).
    test rdi, rdi
    jnz finished
    mov r12, rsi
    mov r13, rcx
    mov r14, rdx
    mov rbx, r12
    mov rcx, r13
    shr rcx, 12
    mov edx, 0x10
    mov eax, 12
    vmcall
    test rax, rax
    jz converted
    mov rsi, rax
    mov eax, 4
    out 0xf5, eax
    jmp finished
converted:
    mov rdi, r12
    mov rcx, r13
    shr rcx, 3
    mov rax, r14
generate:
    call xorshift
    mov [rdi], rax
    add rdi, 8
    dec rcx
    jnz generate
    mov rdi, r12
    mov rsi, r13
    mov eax, 1
    out 0xf5, eax
    mov rdi, r12
    mov rcx, r13
    shr rcx, 3
    mov rax, r14
check:
    call xorshift
    cmp [rdi], rax
    jne lost
    add rdi, 8
    dec rcx
    jnz check
    mov eax, 2
    out 0xf5, eax
    jmp finished
lost:
    mov eax, 3
    out 0xf5, eax
finished:
    xor eax, eax
    out 0xf4, eax
    hlt

# rax = the next xorshift64 state after rax; clobbers rdx
xorshift:
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    ret
