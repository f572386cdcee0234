/*
 * vfio-user: a driver for the vfio-user test device (tests/src/bin/vfio-user-testdev.rs,
 * vendor 0x1234 device 0x0e51), which Isola's core reaches through its vfio-user frontend.
 * Everything runs in ring 3 with port I/O configuration access and MMIO BAR access.
 *
 * Command line: vfio-user.mode=basic|loop|bench|hang and the mode's numbers:
 *   basic                 configuration space, BAR sizing, BAR read/write, MSI-X, DMA
 *   loop   ms=N stall=M   DMA rounds for N ms; a round may take M ms (a server restart is a
 *                         pause): reports the longest wait and every change of server pid
 *   bench  count=N        N forwarded BAR reads and N writes, timed with the TSC
 *   hang                  asks the server to hang, then reads: all ones after a bounded pause;
 *                         then reads until the device answers again (stall=M ms at most)
 * Lines start with "vfio-user: "; success ends with "vfio-user: ok" and a poweroff, failure
 * with "vfio-user: FAIL: <why>" and debug-exit 0x60 (check failed) or 0x61 (no device).
 */
#include "rt.h"

#define VENDOR 0x1234
#define DEVICE 0x0e51
#define MAGIC 0x15014a11u
#define REG_MAGIC 0x00
#define REG_SCRATCH 0x04
#define REG_DMA_ADDR 0x08
#define REG_DMA_LEN 0x10
#define REG_DOORBELL 0x14
#define REG_DOORBELLS 0x18
#define REG_PID 0x1c
#define REG_HANG 0x20
#define DMA_BUFFER 0x800000ull
#define DMA_LEN 4096
#define VECTOR 0x41
#define TIMER_VECTOR 0x30
#define MSIX_ADDRESS 0xfee00000u
#define EXIT_CHECK 0x60
#define EXIT_NO_DEVICE 0x61

static uint32_t bdf;
static uint64_t bar0;
static uint64_t msix_entry;
static uint64_t tsc_per_ms;

__attribute__((noreturn)) static void fail(uint8_t code, const char *why, uint64_t value)
{
	print("vfio-user: FAIL: %s (0x%lx)\n", why, value);
	debug_exit(code);
}

static void check(int ok, const char *why, uint64_t value)
{
	if (!ok)
		fail(EXIT_CHECK, why, value);
}

static uint64_t now_ms(void)
{
	return rdtsc() / tsc_per_ms;
}

static int find_device(void)
{
	for (unsigned slot = 0; slot < 32; slot++) {
		uint32_t id = pci_read32(PCI_BDF(0, slot, 0), PCI_VENDOR_ID);
		if (id == ((uint32_t)DEVICE << 16 | VENDOR)) {
			bdf = PCI_BDF(0, slot, 0);
			return 1;
		}
	}
	return 0;
}

/* Sizes a 64-bit BAR the way an OS does: all ones in, mask out, then the address back. */
static uint64_t bar64_size(unsigned index)
{
	unsigned reg = PCI_BAR0 + 4 * index;
	uint32_t lo = pci_read32(bdf, reg), hi = pci_read32(bdf, reg + 4);
	pci_write32(bdf, reg, 0xffffffff);
	pci_write32(bdf, reg + 4, 0xffffffff);
	uint64_t mask = ((uint64_t)pci_read32(bdf, reg + 4) << 32) | (pci_read32(bdf, reg) & ~0xfu);
	pci_write32(bdf, reg, lo);
	pci_write32(bdf, reg + 4, hi);
	return ~mask + 1;
}

static unsigned find_msix(void)
{
	if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	unsigned cap = pci_read8(bdf, PCI_CAP_PTR) & 0xfc;
	for (int n = 0; cap && n < 48; n++) {
		if (pci_read8(bdf, cap) == PCI_CAP_ID_MSIX)
			return cap;
		cap = pci_read8(bdf, cap + 1) & 0xfc;
	}
	return 0;
}

static void setup_msix(void)
{
	unsigned cap = find_msix();
	check(cap != 0, "no MSI-X capability", 0);
	uint32_t table = pci_read32(bdf, cap + 4);
	uint64_t base = pci_bar_addr(bdf, table & 7);
	check(base != 0, "MSI-X table BAR unassigned", table);
	uint64_t entry = base + (table & ~7u);
	msix_entry = entry;
	mmio_write32(entry + 0, MSIX_ADDRESS);
	mmio_write32(entry + 4, 0);
	mmio_write32(entry + 8, VECTOR);
	mmio_write32(entry + 12, 0);
	check(mmio_read32(entry + 8) == VECTOR, "MSI-X table entry did not stick", mmio_read32(entry + 8));
	uint16_t control = pci_read16(bdf, cap + 2);
	pci_write16(bdf, cap + 2, (control | 0x8000) & ~0x4000);
	control = pci_read16(bdf, cap + 2);
	check(control & 0x8000, "MSI-X enable did not stick", control);
	print("vfio-user: msix vectors=%u\n", (control & 0x7ff) + 1);
}

static void setup(void)
{
	lapic_enable();
	tsc_per_ms = tsc_hz() / 1000;
	if (!find_device())
		fail(EXIT_NO_DEVICE, "no vfio-user test device", 0);
	print("vfio-user: found slot=%u class=0x%x pin=%u\n", (bdf >> 3) & 31,
	      pci_read32(bdf, 8) >> 8, pci_read8(bdf, 0x3d));
	check(pci_read8(bdf, 0x3d) == 0, "interrupt pin is not hidden", pci_read8(bdf, 0x3d));
	uint64_t size = bar64_size(0);
	print("vfio-user: bar0 size=0x%lx\n", size);
	check(size == 0x1000, "BAR 0 size", size);
	pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	uint16_t command = pci_read16(bdf, PCI_COMMAND);
	check((command & 6) == 6, "command register", command);
	bar0 = pci_bar_addr(bdf, 0);
	check(bar0 != 0, "BAR 0 unassigned", 0);
	uint32_t magic = mmio_read32(bar0 + REG_MAGIC);
	print("vfio-user: bar0=0x%lx magic=0x%x\n", bar0, magic);
	check(magic == MAGIC, "magic", magic);
	setup_msix();
	/* A periodic timer, so waiting for the MSI always wakes up to look at the clock. */
	lapic_timer_periodic(TIMER_VECTOR, 1000000);
}

/* Interrupts that came with another doorbell's data: the late answer to an attempt that timed
 * out while the server was replaced. */
static uint32_t late;

/* One DMA round: the device fills the buffer with value + i and raises vector 0. Returns 1 on
 * success, 0 if nothing came within `limit` ms. With `earlier_outstanding`, an earlier doorbell
 * may still be answered (its attempt timed out while the server was away): an interrupt whose
 * data is not this round's is counted as late and the wait goes on. Without it, such an
 * interrupt is a failure. */
static int dma_round(uint8_t value, uint64_t limit, int earlier_outstanding)
{
	volatile uint8_t *buf = (volatile uint8_t *)DMA_BUFFER;
	for (unsigned i = 0; i < DMA_LEN; i++)
		buf[i] = 0;
	uint32_t before = irq_counts[VECTOR];
	mmio_write32(bar0 + REG_DMA_ADDR, (uint32_t)DMA_BUFFER);
	mmio_write32(bar0 + REG_DMA_ADDR + 4, (uint32_t)(DMA_BUFFER >> 32));
	mmio_write32(bar0 + REG_DMA_LEN, DMA_LEN);
	mmio_write32(bar0 + REG_DOORBELL, value);
	uint64_t until = now_ms() + limit;
	for (;;) {
		while (irq_counts[VECTOR] == before) {
			if (now_ms() > until)
				return 0;
			sys_wait_irq(irq_total);
		}
		before = irq_counts[VECTOR];
		unsigned bad = DMA_LEN;
		for (unsigned i = 0; i < DMA_LEN && bad == DMA_LEN; i++)
			if (buf[i] != (uint8_t)(value + i))
				bad = i;
		if (bad == DMA_LEN)
			return 1;
		if (!earlier_outstanding)
			fail(EXIT_CHECK, "DMA data", ((uint64_t)bad << 32) | buf[bad]);
		late++;
	}
}

static void mode_basic(void)
{
	mmio_write32(bar0 + REG_SCRATCH, 0xcafe1234);
	uint32_t scratch = mmio_read32(bar0 + REG_SCRATCH);
	check(scratch == 0xcafe1234, "scratch", scratch);
	mmio_write8(bar0 + REG_SCRATCH, 0x55);
	scratch = mmio_read32(bar0 + REG_SCRATCH);
	print("vfio-user: scratch ok\n");
	check(dma_round(0x3c, 5000, 0), "no MSI-X interrupt after the doorbell", irq_counts[VECTOR]);
	print("vfio-user: dma ok irq=%u\n", irq_counts[VECTOR]);
	uint32_t doorbells = mmio_read32(bar0 + REG_DOORBELLS);
	check(doorbells == 1, "doorbell count", doorbells);
	/* Outside the region (the BAR is a page, the region too): harmless. */
	print("vfio-user: pid=%u\n", mmio_read32(bar0 + REG_PID));
}

static void mode_loop(void)
{
	uint64_t ms = 5000, stall = 30000;
	cmdline_u64("ms", &ms);
	cmdline_u64("stall", &stall);
	uint64_t start = now_ms(), longest = 0;
	uint32_t pid = mmio_read32(bar0 + REG_PID), rounds = 0, retried = 0;
	print("vfio-user: loop pid=%u\n", pid);
	while (now_ms() - start < ms) {
		uint64_t t0 = now_ms();
		/* Each attempt its own pattern (one of 16, 0x30-0x3f, the values a test's server may
		 * take as doorbell ioeventfds), so a late answer to an earlier one is told apart. */
		for (uint32_t tries = 0;
		     !dma_round((uint8_t)(0x30 + ((rounds + retried) & 15)), 1000, tries > 0); tries++) {
			retried++;
			check(now_ms() - t0 < stall, "a round stalled", now_ms() - t0);
		}
		mmio_write32(bar0 + REG_SCRATCH, rounds);
		uint32_t back = mmio_read32(bar0 + REG_SCRATCH);
		if (back != rounds) {
			/* The server was replaced between the write and the read: do it again. */
			retried++;
			continue;
		}
		uint64_t took = now_ms() - t0;
		if (took > longest)
			longest = took;
		uint32_t now_pid = mmio_read32(bar0 + REG_PID);
		if (now_pid != pid && now_pid != 0xffffffff) {
			print("vfio-user: server pid changed %u -> %u after round %u\n", pid, now_pid, rounds);
			pid = now_pid;
		}
		if (rounds % 50 == 0)
			print("vfio-user: round %u\n", rounds);
		rounds++;
	}
	print("vfio-user: rounds=%u retried=%u late=%u longest-wait-ms=%lu\n", rounds, retried, late,
	      longest);
}

static void mode_bench(void)
{
	uint64_t count = 10000;
	cmdline_u64("count", &count);
	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < count; i++)
		check(mmio_read32(bar0 + REG_MAGIC) == MAGIC, "magic in bench", i);
	uint64_t t1 = rdtsc();
	for (uint64_t i = 0; i < count; i++)
		mmio_write32(bar0 + REG_SCRATCH, (uint32_t)i);
	check(mmio_read32(bar0 + REG_SCRATCH) == (uint32_t)(count - 1), "last scratch", 0);
	uint64_t t2 = rdtsc();
	for (uint64_t i = 0; i < count; i++)
		check(mmio_read32(msix_entry + 8) == VECTOR, "MSI-X data in bench", i);
	uint64_t t3 = rdtsc();
	/* Doorbells back to back: what the vCPU pays per doorbell write (the device fills the
	 * buffer and interrupts for each one it sees; nothing here waits for that). */
	mmio_write32(bar0 + REG_DMA_ADDR, (uint32_t)DMA_BUFFER);
	mmio_write32(bar0 + REG_DMA_ADDR + 4, (uint32_t)(DMA_BUFFER >> 32));
	mmio_write32(bar0 + REG_DMA_LEN, DMA_LEN);
	uint64_t t4 = rdtsc();
	for (uint64_t i = 0; i < count; i++)
		mmio_write32(bar0 + REG_DOORBELL, 0x30 + (i & 15));
	uint64_t t5 = rdtsc();
	/* Let the device catch up (a read comes after every forwarded write; doorbells through
	 * an ioeventfd get a moment) before timing whole rounds. */
	(void)mmio_read32(bar0 + REG_DOORBELLS);
	for (uint64_t settle = now_ms() + 200; now_ms() < settle;)
		;
	uint64_t t5b = rdtsc();
	/* Whole DMA rounds, one after the other: doorbell to interrupt and the data checked. */
	uint64_t rounds = count / 20 + 1;
	for (uint64_t i = 0; i < rounds; i++)
		check(dma_round((uint8_t)(0x30 + (i & 15)), 5000, 1), "no interrupt in bench", i);
	uint64_t t6 = rdtsc();
	uint64_t per_us = tsc_per_ms / 1000;
	print("vfio-user: bench reads=%lu read-ns=%lu write-ns=%lu local-ns=%lu doorbell-ns=%lu "
	      "round-ns=%lu\n",
	      count, (t1 - t0) * 1000 / per_us / count, (t2 - t1) * 1000 / per_us / count,
	      (t3 - t2) * 1000 / per_us / count, (t5 - t4) * 1000 / per_us / count,
	      (t6 - t5b) * 1000 / per_us / rounds);
}

static void mode_hang(void)
{
	uint64_t stall = 30000;
	cmdline_u64("stall", &stall);
	mmio_write32(bar0 + REG_HANG, 1);
	uint64_t t0 = now_ms();
	uint32_t v = mmio_read32(bar0 + REG_MAGIC);
	print("vfio-user: hung read=0x%x waited-ms=%lu\n", v, now_ms() - t0);
	check(v == 0xffffffff, "a read of a hung server is all ones", v);
	while (mmio_read32(bar0 + REG_MAGIC) != MAGIC)
		check(now_ms() - t0 < stall, "the device never answered again", now_ms() - t0);
	print("vfio-user: answers again after %lu ms\n", now_ms() - t0);
	check(dma_round(7, 5000, 0) || dma_round(8, 5000, 1), "DMA after the hang", 0);
	print("vfio-user: dma ok after the hang\n");
}

void guest_main(void)
{
	char mode[16] = "basic";
	cmdline_get("vfio-user.mode", mode, sizeof(mode));
	print("vfio-user: start mode=%s\n", mode);
	setup();
	if (str_eq(mode, "basic"))
		mode_basic();
	else if (str_eq(mode, "loop"))
		mode_loop();
	else if (str_eq(mode, "bench"))
		mode_bench();
	else if (str_eq(mode, "hang"))
		mode_hang();
	else
		fail(EXIT_CHECK, "unknown mode", 0);
	print("vfio-user: ok\n");
	poweroff();
}
