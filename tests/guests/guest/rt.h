/*
 * Ring-3 runtime for the Isola test guests: port I/O, serial output, formatting, CRC-32,
 * LAPIC access and timer, the int $0x80 services, SMP bring-up, the boot command line and
 * PCI configuration space.
 *
 * Ring 3 may use every I/O port (IOPL=3 and an all-zero TSS I/O bitmap) and every page
 * (all user-accessible, including the LAPIC MMIO page). It starts with IF=0; interrupts are
 * taken inside sys_wait_irq(). Ring-0 services are requested with a hlt instruction (see
 * shim.S): hlt faults in ring 3 and the #GP handler runs the service in %eax.
 */
#ifndef ISOLA_GUEST_RT_H
#define ISOLA_GUEST_RT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

/* Each guest provides this; it runs in ring 3 and should not return (returning debug-exits
 * with EXIT_MAIN_RETURNED). */
void guest_main(void);

/* ---- Variables owned by shim.S ---- */
extern volatile uint64_t boot_info_ptr;   /* %ebx (PVH) or %rsi (Linux 64-bit) at entry */
extern volatile uint32_t boot_protocol;   /* BOOT_PROTO_PVH or BOOT_PROTO_LINUX64 */
extern volatile uint32_t ap_started;      /* APs that reported in */
extern volatile uint32_t ap_apic_ids[MAX_APS]; /* their APIC ids, in arrival order */
extern volatile uint32_t irq_total;       /* interrupts (vector >= 32) taken so far */
extern volatile uint32_t irq_counts[256]; /* per vector */
extern volatile uint8_t irq_log[IRQ_LOG_SIZE]; /* vector of interrupt n at [n % IRQ_LOG_SIZE] */
extern const char ap_trampoline_start[], ap_trampoline_end[];

/* Optional: defined by a guest that wants each AP to run code in ring 0 after it reports in
 * (interrupts off, a 1 KiB stack); the AP parks when it returns. `index` is the AP's arrival
 * order (0-based). */
void ap_ring0_hook(uint32_t index, uint32_t apic_id) __attribute__((weak));

/* ---- CPUID ---- */
struct cpuid_regs {
	uint32_t eax, ebx, ecx, edx;
};

/* CPUID at the current privilege level (ring 3 in guest_main: on hosts that emulate only guest
 * ring 0, it runs natively there). */
static inline struct cpuid_regs cpuid_here(uint32_t leaf, uint32_t subleaf)
{
	struct cpuid_regs r;
	__asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(subleaf));
	return r;
}

/* CPUID executed in ring 0 (the SYS_CPUID service), where a guest kernel executes it. */
static inline struct cpuid_regs cpuid_ring0(uint32_t leaf, uint32_t subleaf)
{
	struct cpuid_regs r;
	__asm__ volatile("hlt" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(SYS_CPUID), "D"(leaf), "S"(subleaf) : "memory");
	return r;
}

/* ---- Port and memory access ---- */
static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint8_t mmio_read8(uint64_t addr)
{
	return *(volatile uint8_t *)addr;
}

static inline void mmio_write8(uint64_t addr, uint8_t v)
{
	*(volatile uint8_t *)addr = v;
}

static inline uint16_t mmio_read16(uint64_t addr)
{
	return *(volatile uint16_t *)addr;
}

static inline void mmio_write16(uint64_t addr, uint16_t v)
{
	*(volatile uint16_t *)addr = v;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
	return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uint64_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

/* Reads physical memory (identity mapped below 4 GiB) without letting the compiler assume
 * anything about the address. */
static inline const volatile uint8_t *phys(uint64_t addr)
{
	return (const volatile uint8_t *)addr;
}

uint8_t peek8(uint64_t addr);
uint16_t peek16(uint64_t addr);
uint32_t peek32(uint64_t addr);
uint64_t peek64(uint64_t addr);

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* Compiler barrier: enough on x86 to order stores after stores and loads after loads. */
static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

/* Full barrier (also orders an earlier store before a later load), without SSE's mfence. */
static inline void mb(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc");
}

void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);

/* ---- Serial (COM1) ---- */
void serial_putc(char c);
void serial_puts(const char *s);
void serial_write(const volatile uint8_t *p, size_t n);
/* printf subset: %% %c %s %d %u %x with optional '0' flag, width and 'l' length modifier. */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void vprint(const char *fmt, va_list ap);

/* ---- CRC-32 (IEEE 802.3, reflected 0xEDB88320, init/xorout 0xFFFFFFFF; = crc32fast) ---- */
uint32_t crc32(const volatile uint8_t *p, uint64_t n);

/* ---- Exits and ring-0 services ---- */
/* Unless irq_total != seen already, enable interrupts and halt until one has been taken.
 * The test runs in ring 0 with interrupts off, so no wakeup is lost. */
void sys_wait_irq(uint32_t seen);
__attribute__((noreturn)) void sys_stop(void);     /* cli; hlt forever */
__attribute__((noreturn)) void sys_triple_fault(void);
__attribute__((noreturn)) void poweroff(void);     /* ACPI S5, else debug-exit 0, else stop */
__attribute__((noreturn)) void debug_exit(uint8_t v);
__attribute__((noreturn)) void reset(void);        /* i8042 reset */

/* ---- LAPIC ---- */
uint32_t lapic_id(void);
void lapic_enable(void);                           /* mask the 8259s; SVR = 0x1ff */

/* Periodic LAPIC timer interrupts at `vector`, every `count` x 16 APIC bus cycles (KVM's APIC
 * bus runs at 1 GHz); count 0 stops the timer. */
void lapic_timer_periodic(uint8_t vector, uint32_t count);
/* TSC ticks per second, measured once against the LAPIC timer's current-count register
 * (1 GHz APIC bus, as KVM emulates it); leaves the timer stopped. */
uint64_t tsc_hz(void);

/* ---- Boot information ---- */
/* Address of the NUL-terminated command line (PVH or boot_params, whichever we came in by),
 * 0 if none or not below 4 GiB. */
uint64_t boot_cmdline(void);
/* End of the highest RAM range in the memory map (0 if there is no map). */
uint64_t boot_ram_end(void);
/* Copies the value of the first `key=VALUE` token of the command line (space separated) into
 * out (NUL-terminated, truncated to size - 1); returns 1 if found, else 0. */
int cmdline_get(const char *key, char *out, size_t size);
/* Numeric `key=VALUE` (decimal, or hex with 0x): 1 and *out set if present and well formed,
 * 0 if absent, -1 if malformed. */
int cmdline_u64(const char *key, uint64_t *out);
int str_eq(const char *a, const char *b);

/* ---- PCI configuration space (mechanism #1, ports 0xcf8/0xcfc) ---- */
#define PCI_BDF(bus, slot, fn) (((uint32_t)(bus) << 8) | ((uint32_t)(slot) << 3) | (fn))
#define PCI_VENDOR_ID       0x00
#define PCI_DEVICE_ID       0x02
#define PCI_COMMAND         0x04
#define PCI_STATUS          0x06
#define PCI_HEADER_TYPE     0x0e
#define PCI_BAR0            0x10
#define PCI_CAP_PTR         0x34
#define PCI_COMMAND_MEMORY  0x0002
#define PCI_COMMAND_MASTER  0x0004
#define PCI_STATUS_CAP_LIST 0x0010
#define PCI_CAP_ID_VNDR     0x09
#define PCI_CAP_ID_MSIX     0x11

uint32_t pci_read32(uint32_t bdf, unsigned offset);
uint16_t pci_read16(uint32_t bdf, unsigned offset);
uint8_t pci_read8(uint32_t bdf, unsigned offset);
void pci_write32(uint32_t bdf, unsigned offset, uint32_t v);
void pci_write16(uint32_t bdf, unsigned offset, uint16_t v);
void pci_write8(uint32_t bdf, unsigned offset, uint8_t v);
/* Address of memory BAR `index` (64-bit BARs combine two registers); 0 for an I/O BAR or
 * an unassigned one. */
uint64_t pci_bar_addr(uint32_t bdf, unsigned index);

/* ---- SMP ---- */
struct mp_info {
	uint64_t mpf_addr;              /* floating pointer address, 0 if none found */
	unsigned cpus;                  /* enabled processor entries */
	uint8_t apic_ids[MAX_CPUS];     /* their APIC ids, in table order */
};

/* Finds and walks the MP table (see rt.c for the search order). */
void mp_find(struct mp_info *info);

/*
 * Starts the APs whose APIC ids are listed (the caller leaves out the BSP): copies the
 * trampoline to AP_TRAMPOLINE, then INIT + 2x STARTUP IPI each. Waits (bounded, about 2 s)
 * until all of them have reported in. Returns the number that did (ap_started).
 */
unsigned smp_start_aps(const uint8_t *apic_ids, unsigned n);

#endif
