/*
 * Ring-0 shim shared by every Isola test guest.
 *
 * Under nested KVM (kvm_pvm) ring-0 and real-mode code is emulated one instruction at a time,
 * so this file does as little as possible: no loops on normal paths, no SSE, no int3/ud2.
 * Everything that can be computed at assembly/link time is (page tables, GDT, IDT).
 * After the entry stubs it drops to ring 3, where the C code runs natively: all pages are
 * user-accessible and every I/O port is allowed (IOPL=3 for plain KVM/TCG, plus an all-zero
 * TSS I/O bitmap because kvm_pvm ignores IOPL in ring 3). Ring 3 gets back into ring 0 only
 * through interrupts, exceptions and the hlt-trap services (see exception_entry).
 *
 * Entry points (physical = virtual addresses, image linked at IMAGE_BASE):
 *   IMAGE_BASE + 0x000  pvh_entry: 32-bit PVH entry (Xen PVH boot ABI), %ebx = hvm_start_info
 *   IMAGE_BASE + 0x200  entry64:   Linux 64-bit boot protocol entry, %rsi = boot_params
 * Both write "\n" to COM1 as their very first instructions (the boot marker).
 */
#include "layout.h"

/* ------------------------------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen", 32-bit entry address.         */
/* ------------------------------------------------------------------------------------------ */
	.section .note.pvh, "a", @note
	.balign 4
	.long 4                         /* namesz */
	.long 4                         /* descsz */
	.long 18                        /* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_entry

/* ------------------------------------------------------------------------------------------ */
/* Entry stubs. The linker script places .head first, at IMAGE_BASE.                          */
/* ------------------------------------------------------------------------------------------ */
	.section .head, "ax", @progbits
	.code32
	.globl pvh_entry
pvh_entry:
	/* Boot marker: nothing may come before it. */
	mov $COM1, %dx
	mov $0x0a, %al
	outb %al, %dx
	/* DS is flat per the PVH ABI. boot_info_ptr's upper half is 0 from the image. */
	mov %ebx, boot_info_ptr
	movl $BOOT_PROTO_PVH, boot_protocol
	mov $bsp_entry64, %edi
	jmp to_long_mode32

/*
 * Protected mode (paging off, flat CS) -> long mode, then jump to the 64-bit address in %edi.
 * Shared by the PVH entry and the AP trampoline. Clobbers eax, ecx, edx.
 */
to_long_mode32:
	lgdt gdt_ptr
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov $(CR4_PAE | CR4_SSE), %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	and $~(CR0_CD | CR0_NW | CR0_EM), %eax
	or $(CR0_PG | CR0_PE | CR0_MP), %eax
	mov %eax, %cr0
	ljmp $SEL_KCODE64, $long_landing
	.code64
long_landing:
	mov %edi, %edi
	jmp *%rdi

	.org ENTRY64_OFFSET
	.globl entry64
entry64:
	/* Boot marker: nothing may come before it. */
	mov $COM1, %dx
	mov $0x0a, %al
	outb %al, %dx
	mov %rsi, boot_info_ptr
	movl $BOOT_PROTO_LINUX64, boot_protocol
	lgdt gdt_ptr
	/* Keep PAE (and LA57 if ever set); drop what would get in the way of ring 3. */
	mov %cr4, %rax
	and $~(CR4_TSD | CR4_SMEP | CR4_SMAP), %rax
	or $CR4_SSE, %rax
	mov %rax, %cr4
	mov %cr0, %rax
	and $~CR0_EM, %rax
	or $CR0_MP, %rax
	mov %rax, %cr0
	mov $pml4, %eax
	mov %rax, %cr3
	/* Reload CS from our GDT, on our own stack (the protocol promises none). */
	mov $kernel_stack_top, %rsp
	pushq $SEL_KCODE64
	pushq $bsp_entry64
	lretq

/* ------------------------------------------------------------------------------------------ */
/* Common 64-bit ring-0 code.                                                                  */
/* ------------------------------------------------------------------------------------------ */
	.text
	.code64
bsp_entry64:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $kernel_stack_top, %rsp
	mov $SEL_TSS, %eax
	ltr %ax
	lidt idt_ptr
	/* iretq to ring 3 at user_start on the user stack. */
	pushq $(SEL_UDATA | 3)
	pushq $user_stack_top
	pushq $USER_RFLAGS
	pushq $(SEL_UCODE64 | 3)
	pushq $user_start
	iretq

/* Application processors arrive here from the trampoline, in long mode with our GDT. */
ap_entry64:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov $1, %eax
	lock xadd %eax, ap_next
	cmp $MAX_APS, %eax
	jae halt_forever
	lea 1(%rax), %ecx
	shl $AP_STACK_SHIFT, %ecx
	lea ap_stacks(%rcx), %rsp
	lidt idt_ptr
	mov $LAPIC_ID, %edx
	mov (%rdx), %edx
	shr $24, %edx
	mov %edx, ap_apic_ids(, %rax, 4)
	lock incl ap_started
	/* A guest may define ap_ring0_hook(index, apic_id) (weak: absent in most): it runs here,
	 * in ring 0 on this AP's 1 KiB stack with interrupts off, then the AP parks. */
	mov $ap_ring0_hook, %ecx
	test %ecx, %ecx
	jz halt_forever
	mov %eax, %edi
	mov %edx, %esi
	call *%rcx
	/* fall through: park */
halt_forever:
	cli
	hlt
	jmp halt_forever

/*
 * Every IDT vector enters here with the vector number at 0(%rsp) and the error code (0 if the
 * CPU pushes none) at 8(%rsp), followed by the CPU's interrupt frame (RIP at 16, CS at 24).
 */
isr_common:
	cmpq $32, (%rsp)
	jb exception_entry
	/* External interrupt / IPI: count it, log it, EOI (not for the spurious vector). */
	push %rax
	push %rdx
	mov 16(%rsp), %rax
	incl irq_counts(, %rax, 4)
	mov irq_total, %edx
	and $(IRQ_LOG_SIZE - 1), %edx
	mov %al, irq_log(%rdx)
	incl irq_total
	cmp $SPURIOUS_VECTOR, %eax
	je 1f
	mov $LAPIC_EOI, %edx
	movl $0, (%rdx)
1:	pop %rdx
	pop %rax
	add $16, %rsp
	iretq

/*
 * Ring-0 services. Ring 3 asks for one by executing hlt with the service number in %eax (and
 * an argument in %edi): hlt faults with #GP(0) at CPL 3, and a #GP from ring 3 whose RIP
 * points at a hlt opcode (0xf4) is taken as a request. The service returns to the instruction
 * after the hlt with all registers preserved. (int $0x80 is not used: under nested kvm_pvm a
 * software interrupt from ring 3 raises #UD instead.)
 */
exception_entry:
	cmpq $13, (%rsp)
	jne exception_report
	testb $3, 24(%rsp)
	jz exception_report
	push %rcx
	mov 24(%rsp), %rcx              /* faulting RIP (8 further up after the push) */
	cmpb $0xf4, (%rcx)
	pop %rcx
	jne exception_report
	incq 16(%rsp)                   /* resume after the one-byte hlt */
	add $16, %rsp                   /* drop vector and error code */
	cmp $SYS_WAIT_IRQ, %eax
	je svc_wait_irq
	cmp $SYS_STOP, %eax
	je halt_forever
	cmp $SYS_TRIPLE_FAULT, %eax
	je svc_triple_fault
	cmp $SYS_CPUID, %eax
	je svc_cpuid
	iretq
svc_cpuid:
	/* CPUID executed in ring 0 (where a guest kernel runs it): leaf %edi, subleaf %esi;
	 * the results come back in eax, ebx, ecx, edx. */
	mov %edi, %eax
	mov %esi, %ecx
	cpuid
	iretq
svc_wait_irq:
	/* Interrupts are off here (interrupt gate), so this test cannot race with the handler. */
	cmp irq_total, %edi
	jne 1f
	/* The sti shadow covers hlt, so an interrupt pending now still wakes us. */
	sti
	hlt
	cli
1:	iretq
svc_triple_fault:
	lidt null_idt_ptr
	movabs $0x8000000000000000, %rax
	mov (%rax), %rax                /* #GP -> #DF -> triple fault */
	jmp halt_forever

/* Print "exception: vector=0x.. error=0x... rip=0x...", then debug-exit(EXIT_EXCEPTION). */
exception_report:
	mov 0(%rsp), %r12
	mov 8(%rsp), %r13
	mov 16(%rsp), %r14
	mov $exc_msg_vector, %rsi
	call put_str0
	mov %r12, %rbx
	mov $2, %ecx
	call put_hex0
	mov $exc_msg_error, %rsi
	call put_str0
	mov %r13, %rbx
	mov $16, %ecx
	call put_hex0
	mov $exc_msg_rip, %rsi
	call put_str0
	mov %r14, %rbx
	mov $16, %ecx
	call put_hex0
	mov $exc_msg_nl, %rsi
	call put_str0
	mov $EXIT_EXCEPTION, %al
	mov $PORT_DEBUG_EXIT, %dx
	outb %al, %dx
	jmp halt_forever

/* Ring-0 output helpers (exception path only). put_str0: %rsi = NUL-terminated string. */
put_str0:
	mov $COM1, %dx
1:	movzbl (%rsi), %eax
	test %eax, %eax
	jz 2f
	outb %al, %dx
	inc %rsi
	jmp 1b
2:	ret

/* put_hex0: %rbx = value, %ecx = number of low-order hex digits (1..16). */
put_hex0:
	mov %ecx, %edi
	neg %ecx
	add $16, %ecx
	shl $2, %ecx
	shl %cl, %rbx
	mov $COM1, %dx
1:	rol $4, %rbx
	mov %ebx, %eax
	and $0xf, %eax
	movzbl hex_digits(%rax), %eax
	outb %al, %dx
	dec %edi
	jnz 1b
	ret

/* ------------------------------------------------------------------------------------------ */
/* Ring 3 start: zero .bss natively, run guest_main.                                           */
/* ------------------------------------------------------------------------------------------ */
	.globl user_start
user_start:
	mov $__bss_start, %edi
	mov $__bss_end, %ecx
	sub %edi, %ecx
	xor %eax, %eax
	cld
	rep stosb
	call guest_main
	mov $EXIT_MAIN_RETURNED, %al
	mov $PORT_DEBUG_EXIT, %dx
	outb %al, %dx
	mov $SYS_STOP, %eax
	hlt

/* ------------------------------------------------------------------------------------------ */
/* AP trampoline: copied to AP_TRAMPOLINE by the BSP, entered in real mode at CS:IP = 0800:0000. */
/* Position-dependent on AP_TRAMPOLINE: internal addresses are AP_TRAMPOLINE + offset.          */
/* ------------------------------------------------------------------------------------------ */
#define TRAMP(sym) (AP_TRAMPOLINE + ((sym) - ap_trampoline_start))
	.section .rodata.trampoline, "a", @progbits
	.balign 16
	.globl ap_trampoline_start, ap_trampoline_end
	.code16
ap_trampoline_start:
	cli
	xor %ax, %ax
	mov %ax, %ds
	lgdtl TRAMP(tramp_gdt_ptr)
	mov %cr0, %eax
	and $~(CR0_CD | CR0_NW), %eax
	or $CR0_PE, %eax
	mov %eax, %cr0
	ljmpl $SEL_KCODE32, $TRAMP(tramp_prot32)
	.code32
tramp_prot32:
	mov $SEL_KDATA, %eax            /* DS still has its real-mode 64 KiB limit */
	mov %eax, %ds
	mov $ap_entry64, %edi
	mov $to_long_mode32, %eax
	jmp *%eax
	.balign 8
tramp_gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
ap_trampoline_end:
	.code64

/* ------------------------------------------------------------------------------------------ */
/* Interrupt stubs: 256 x 16 bytes at a 4 KiB-aligned address (the IDT is built from that).    */
/* ------------------------------------------------------------------------------------------ */
	.section .isr, "ax", @progbits
	.balign 4096
	.globl isr_table
isr_table:
	vec = 0
	.rept 256
	.org isr_table + 16 * vec
	.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	/* the CPU pushed an error code */
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	vec = vec + 1
	.endr
	.org isr_table + 4096

/* ------------------------------------------------------------------------------------------ */
/* Data.                                                                                       */
/* ------------------------------------------------------------------------------------------ */
	.section .rodata
exc_msg_vector:	.asciz "\nexception: vector=0x"
exc_msg_error:	.asciz " error=0x"
exc_msg_rip:	.asciz " rip=0x"
exc_msg_nl:	.asciz "\n"
hex_digits:	.ascii "0123456789abcdef"

	.data
	.balign 16
gdt:
	.quad 0                         /* 0x00 null */
	.quad 0x00cf9a000000ffff        /* 0x08 kernel code, 32-bit (AP trampoline) */
	.quad 0x00af9a000000ffff        /* 0x10 kernel code, 64-bit */
	.quad 0x00cf92000000ffff        /* 0x18 kernel data */
	.quad 0x00cff2000000ffff        /* 0x20 user data (DPL 3) */
	.quad 0x00affa000000ffff        /* 0x28 user code, 64-bit (DPL 3) */
	/* 0x30 64-bit TSS descriptor; the base pieces are computed by the linker script. */
	.word tss_end - tss - 1
	.word tss_base_15_0
	.byte tss_base_23_16
	.byte 0x89                      /* present, DPL 0, available 64-bit TSS */
	.byte 0
	.byte tss_base_31_24
	.long 0                         /* base 63:32: the image is below 4 GiB */
	.long 0
gdt_end:

	.balign 8
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 8
idt_ptr:
	.word 256 * 16 - 1
	.quad idt
	.balign 8
null_idt_ptr:
	.word 0
	.quad 0

	.balign 16
	.globl tss
tss:
	.long 0
	.quad kernel_stack_top          /* rsp0 */
	.quad 0, 0                      /* rsp1, rsp2 */
	.quad 0
	.quad 0, 0, 0, 0, 0, 0, 0       /* ist1..7 */
	.quad 0
	.word 0
	.word tss_iomap - tss           /* I/O permission bitmap offset */
	/* Every port allowed from ring 3. IOPL=3 would do on plain KVM, but nested kvm_pvm
	 * ignores IOPL in ring 3 and only honours the TSS bitmap. */
tss_iomap:
	.fill 65536 / 8, 1, 0
	.byte 0xff                      /* required terminator */
tss_end:

/* Variables shared with C (rt.h). They live in .data because ring 0 writes some of them
 * before ring 3 zeroes .bss. */
	.balign 8
	.globl boot_info_ptr, boot_protocol, ap_next, ap_started, ap_apic_ids
	.globl irq_total, irq_counts, irq_log
	.weak ap_ring0_hook
boot_info_ptr:	.quad 0
boot_protocol:	.long 0
ap_next:	.long 0
ap_started:	.long 0
irq_total:	.long 0
ap_apic_ids:	.fill MAX_APS, 4, 0
	.balign 4
irq_counts:	.fill 256, 4, 0
irq_log:	.fill IRQ_LOG_SIZE, 1, 0

/* IDT: interrupt gates to isr_table + 16 * vector. */
	.balign 4096
idt:
	vec = 0
	.rept 256
	.word isr_table_15_0 + 16 * vec /* offset 15:0 (isr_table is 4 KiB aligned: no carry) */
	.word SEL_KCODE64
	.byte 0                         /* IST */
	.byte 0x8e                      /* present, DPL 0, 64-bit interrupt gate */
	.word isr_table_31_16           /* offset 31:16 */
	.long 0                         /* offset 63:32 */
	.long 0
	vec = vec + 1
	.endr

/* Identity map of 0-4 GiB with 2 MiB pages, every entry Present|RW|User. The top GiB (MMIO:
 * IOAPIC, LAPIC) is additionally PCD|PWT. */
#define PTE_P   0x01
#define PTE_RW  0x02
#define PTE_US  0x04
#define PTE_PWT 0x08
#define PTE_PCD 0x10
#define PTE_PS  0x80
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + (PTE_P | PTE_RW | PTE_US)
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x1000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x2000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x3000 + (PTE_P | PTE_RW | PTE_US)
	.fill 508, 8, 0
pd:
	page = 0
	.rept 2048
	.if page < 1536
	.quad (page << 21) | (PTE_P | PTE_RW | PTE_US | PTE_PS)
	.else
	.quad (page << 21) | (PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PWT | PTE_PCD)
	.endif
	page = page + 1
	.endr

/* ------------------------------------------------------------------------------------------ */
/* Stacks: not loaded, not zeroed.                                                             */
/* ------------------------------------------------------------------------------------------ */
	.section .stacks, "aw", @nobits
	.balign 4096
kernel_stack:
	.skip KERNEL_STACK_SIZE
kernel_stack_top:
user_stack:
	.skip USER_STACK_SIZE
user_stack_top:
ap_stacks:                              /* AP n (0-based) uses [ap_stacks + n*1K, +1K) */
	.skip MAX_APS << AP_STACK_SHIFT

	.section .note.GNU-stack, "", @progbits
