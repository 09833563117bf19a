/*
 * dirtier: multiboot (v1) entry point, GDT and exception stubs.
 *
 * QEMU's multiboot loader (and GRUB) enter here in 32-bit protected mode, paging off,
 * interrupts off, EAX = 0x2BADB002, EBX = physical address of the multiboot info.
 */
        .set MB_MAGIC,    0x1BADB002
        .set MB_FLAGS,    0x00000003        /* page-align modules, want mem_* info */
        .set MB_CHECKSUM, -(MB_MAGIC + MB_FLAGS)

        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long MB_CHECKSUM

        .section .text
        .globl _start
        .type _start, @function
_start:
        cli
        cld
        movl %eax, %esi                     /* keep loader magic and info pointer */
        movl %ebx, %edi

        lgdt gdt_desc
        ljmp $0x08, $1f
1:      movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss

        /* Zero .bss ourselves (the stack lives there too); the multiboot info lies
           above the loaded image, so it is not touched. */
        movl %edi, %edx
        movl $__bss_start, %edi
        movl $__bss_end, %ecx
        subl %edi, %ecx
        xorl %eax, %eax
        rep stosb
        movl %edx, %edi

        movl $stack_top, %esp
        xorl %ebp, %ebp
        pushl %edi                          /* kmain(magic, info) */
        pushl %esi
        call kmain
2:      cli
        hlt
        jmp 2b
        .size _start, . - _start

/* ---- exception stubs: push a uniform frame and call fault_handler(frame) ---- */
        .macro ISR_NOERR n
isr\n:
        pushl $0
        pushl $\n
        jmp isr_common
        .endm

        .macro ISR_ERR n
isr\n:
        pushl $\n
        jmp isr_common
        .endm

        .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        ISR_NOERR \n
        .endr
        .irp n, 8,10,11,12,13,14,17,21,29,30
        ISR_ERR \n
        .endr

isr_common:
        pushal
        pushl %esp                          /* struct fault_frame * */
        call fault_handler                  /* returns only for NMI */
        addl $4, %esp
        popal
        addl $8, %esp                       /* vector, error code */
        iret

        .section .rodata
        .balign 4
        .globl isr_table
isr_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .long isr\n
        .endr

        .balign 8
gdt:
        .quad 0x0000000000000000
        .quad 0x00CF9A000000FFFF            /* 0x08: flat 32-bit code */
        .quad 0x00CF92000000FFFF            /* 0x10: flat 32-bit data */
gdt_end:
        .balign 4
        .word 0
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt

        .section .bss
        .balign 16
stack_bottom:
        .skip 32768
stack_top:

        .section .note.GNU-stack, "", @progbits
