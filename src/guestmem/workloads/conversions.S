# conversions: the private_mem_conversions_test flow at workload scale (64-bit, CPL0).
#
# Entry: RDI = vCPU index, RSI = slice base GPA, RDX = slice size, RCX = iterations.
# Each iteration picks a 4 MiB window of the slice (moving through it) and, for the sizes
# 4 KiB, 2 MiB and 2 MiB + 4 KiB: converts the range to private (MAP_GPA_RANGE with
# ENCRYPTED), fills it with a private pattern and verifies it, asks the host to check that
# the pattern never shows in its shared view; converts it back to shared, fills a shared
# pattern, asks the host to check it arrived (the host then writes its own pattern), and
# verifies the host's pattern.
#
# PORT_SYNC (0xF5) ops in EAX, arguments in RDI = gpa, RSI = size, RDX = pattern qword:
#   1 check_private   2 check_shared   3 guest_mismatch   4 map_failed (RSI = ret)   5 progress
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, rdi
    xor ebp, ebp
iteration:
    mov rax, rbp
    shl rax, 22
    xor edx, edx
    div r13
    lea r10, [r12 + rdx]
    mov r9, 0x1000
    call cycle
    mov r9, 0x200000
    call cycle
    mov r9, 0x201000
    call cycle
    mov rdi, rbp
    mov eax, 5
    out 0xf5, eax
    inc rbp
    cmp rbp, r14
    jb iteration
    xor eax, eax
    out 0xf4, eax
    hlt

cycle:
    lea rax, [rbp + rbp*2]
    lea rax, [rax + r15*8]
    add rax, r9
    shr rax, 3
    and eax, 0x3f
    or eax, 0x80
    mov rbx, 0x0101010101010101
    imul rax, rbx
    mov r8, rax
    mov edx, 0x10
    call map
    mov rax, r8
    call fill
    call verify
    mov eax, 1
    call sync
    xor edx, edx
    call map
    mov rax, 0xc0c0c0c0c0c0c0c0
    xor r8, rax
    mov rax, r8
    call fill
    mov eax, 2
    call sync
    not r8
    call verify
    ret

map:
    mov rbx, r10
    mov rcx, r9
    shr rcx, 12
    mov eax, 12
    vmcall
    test rax, rax
    jz map_ok
    mov rsi, rax
    mov rdi, r10
    mov eax, 4
    out 0xf5, eax
map_ok:
    ret

fill:
    mov rdi, r10
    mov rcx, r9
    shr rcx, 3
    rep stosq
    ret

verify:
    mov rax, r8
    mov rdi, r10
    mov rcx, r9
    shr rcx, 3
    repe scasq
    je verify_ok
    sub rdi, 8
    mov rsi, r9
    mov rdx, r8
    mov eax, 3
    out 0xf5, eax
verify_ok:
    ret

sync:
    mov rdi, r10
    mov rsi, r9
    mov rdx, r8
    out 0xf5, eax
    ret
