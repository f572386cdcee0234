/*
 * Constants shared by the assembly shim (shim.S), the runtime (rt.c) and the guests.
 * Included from both assembly and C, so only #defines here.
 */
#ifndef ISOLA_GUEST_LAYOUT_H
#define ISOLA_GUEST_LAYOUT_H

/* Physical (= virtual, identity mapped) load address of every guest image. */
#define IMAGE_BASE          0x100000
/* The Linux 64-bit boot protocol entry sits this far into the protected-mode payload. */
#define ENTRY64_OFFSET      0x200

/* Ports. */
#define COM1                0x3f8
#define COM1_LSR            (COM1 + 5)
#define PORT_ACPI_SLEEP     0x3c0   /* ACPI hardware-reduced sleep control register */
#define ACPI_SLEEP_S5       0x34    /* SLP_TYP=5 << 2 | SLP_EN (bit 5) */
#define PORT_DEBUG_EXIT     0xf4
#define PORT_I8042          0x64
#define PIC1_DATA           0x21    /* 8259 interrupt mask registers */
#define PIC2_DATA           0xa1
#define PCI_CONF1_ADDRESS   0xcf8   /* PCI configuration mechanism #1 */
#define PCI_CONF1_DATA      0xcfc

/* Debug-exit values used by the shim itself. */
#define EXIT_EXCEPTION      0x7f    /* unexpected CPU exception */
#define EXIT_MAIN_RETURNED  0x7e    /* guest_main returned */

/* Local APIC (xAPIC MMIO). */
#define LAPIC_BASE          0xfee00000
#define LAPIC_ID            (LAPIC_BASE + 0x020)
#define LAPIC_EOI           (LAPIC_BASE + 0x0b0)
#define LAPIC_SVR           (LAPIC_BASE + 0x0f0)
#define LAPIC_ICR_LO        (LAPIC_BASE + 0x300)
#define LAPIC_ICR_HI        (LAPIC_BASE + 0x310)
#define LAPIC_LVT_TIMER     (LAPIC_BASE + 0x320)
#define LAPIC_TIMER_INIT    (LAPIC_BASE + 0x380)
#define LAPIC_TIMER_CURRENT (LAPIC_BASE + 0x390)
#define LAPIC_TIMER_DIVIDE  (LAPIC_BASE + 0x3e0)

/* SMP: the AP trampoline is copied here; the STARTUP IPI vector is its page number. */
#define AP_TRAMPOLINE       0x8000
#define AP_SIPI_VECTOR      (AP_TRAMPOLINE >> 12)
#define MAX_CPUS            256
#define MAX_APS             (MAX_CPUS - 1)
#define AP_STACK_SHIFT      10      /* 1 KiB ring-0 stack per AP (only used by exceptions) */
#define KERNEL_STACK_SIZE   0x4000
#define USER_STACK_SIZE     0x10000

/* GDT selectors. */
#define SEL_KCODE32         0x08
#define SEL_KCODE64         0x10
#define SEL_KDATA           0x18
#define SEL_UDATA           0x20
#define SEL_UCODE64         0x28
#define SEL_TSS             0x30

/* RFLAGS of ring 3 at guest_main: IOPL=3, IF=0, reserved bit 1. */
#define USER_RFLAGS         0x3002

/* Ring-0 services: ring 3 executes hlt with the service number in %eax (see shim.S). */
#define SYS_WAIT_IRQ        1       /* if irq_total == %edi: sti; hlt (wait for an interrupt) */
#define SYS_STOP            2       /* cli; hlt forever */
#define SYS_TRIPLE_FAULT    3       /* load an empty IDT and raise #GP */
#define SYS_CPUID           4       /* cpuid in ring 0: leaf %edi, subleaf %esi -> eax..edx */
#define SPURIOUS_VECTOR     0xff
#define IRQ_LOG_SIZE        64      /* power of two */

/* How the image was entered (boot_protocol). */
#define BOOT_PROTO_PVH      1
#define BOOT_PROTO_LINUX64  2

/* Control-register bits. */
#define CR0_PE              0x00000001
#define CR0_MP              0x00000002
#define CR0_EM              0x00000004
#define CR0_NW              0x20000000
#define CR0_CD              0x40000000
#define CR0_PG              0x80000000
#define CR4_TSD             0x00000004
#define CR4_PAE             0x00000020
#define CR4_OSFXSR          0x00000200
#define CR4_OSXMMEXCPT      0x00000400
/* SSE on for ring-3 code that uses it (the Rust guest's prebuilt core); C code has none. */
#define CR4_SSE             (CR4_OSFXSR | CR4_OSXMMEXCPT)
#define CR4_SMEP            0x00100000
#define CR4_SMAP            0x00200000
#define MSR_EFER            0xc0000080
#define EFER_LME            0x00000100

#endif
