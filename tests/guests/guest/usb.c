/*
 * usb: a small xHCI driver for isola-usb (an xHCI controller served over vfio-user), in
 * ring 3 with port I/O configuration access and MMIO BAR access. It resets and runs the
 * controller, prints every port's status, enumerates the HID keyboard (port 1) and the
 * mass-storage disk (port 3) (Address Device, GET_DESCRIPTOR device and configuration,
 * SET_CONFIGURATION, Configure Endpoint), reads keyboard reports from the interrupt endpoint,
 * reads block 0 (what the host put there) and prints its CRC-32, then writes blocks 1..N,
 * reads them back and verifies them. It waits for events on the MSI-X interrupt. A restart of isola-usb shows as Host System Error (or as
 * a controller that answers all ones while it is away): the driver then resets the
 * controller, enumerates again and goes on; a sector whose write was not acknowledged is
 * written again, and every acknowledged one is verified at the end.
 *
 * Command line: usb.sectors=N (1000): blocks 1..N are written; usb.keys=N (4): key reports to read before and after
 * the storage run. usb.mode=bench (default usb.mode=test) instead, after enumeration, reads
 * 4 KiB (8 blocks, READ(10)) at random 4 KiB-aligned blocks across the whole disk, one
 * command at a time, for usb.ms=N milliseconds (3000), checks that every block read begins
 * with its own number (u64, little endian: the host prepares the image so), and prints
 * "usb: bench reads=N ms=T iops=X"; no keys, no writes, no restarts. Lines start with "usb: "; success ends with "usb: ok" and a poweroff,
 * failure with "usb: FAIL: <why>" and debug-exit 0x60 (check failed) or 0x61 (no device).
 */
#include "rt.h"

#define EXIT_CHECK 0x60
#define EXIT_NO_DEVICE 0x61
#define VECTOR 0x42
#define TIMER_VECTOR 0x40
#define MSIX_ADDRESS 0xfee00000u

#define MEM 0x800000ull
#define DCBAA (MEM + 0x1000)
#define CMD_RING (MEM + 0x2000)
#define ERST (MEM + 0x3000)
#define EVENT_RING (MEM + 0x4000)
#define EVENT_TRBS 64
#define INPUT_CTX (MEM + 0x5000)
#define OUT_CTX(slot) (MEM + 0x8000 + (uint64_t)(slot) * 0x400)
#define RING_TRBS 64
#define RING(slot, dci) (MEM + 0x20000 + ((uint64_t)(slot) * 32 + (dci)) * RING_TRBS * 16)
#define DATA (MEM + 0x80000)
#define SECTOR_BUF (MEM + 0x90000)
#define CLEAR_LEN 0xa0000

/* TRB types and completion codes. */
#define T_NORMAL 1
#define T_SETUP 2
#define T_DATA 3
#define T_STATUS 4
#define T_LINK 6
#define T_ENABLE_SLOT 9
#define T_ADDRESS 11
#define T_CONFIGURE 12
#define T_TRANSFER 32
#define T_COMPLETION 33
#define CC_SUCCESS 1
#define CC_SHORT 13
#define F_IOC (1u << 5)
#define F_IDT (1u << 6)
#define F_ISP (1u << 2)
#define F_TC (1u << 1)
#define DIR_IN (1u << 16)

#define OP 0x40
#define RT 0x1000
#define DB 0x2000
#define STS_HCH 1u
#define STS_HSE 4u
#define AWAY 0xffffffffu

/* Why an exchange ended early: the controller is gone or reported an error. */
#define RESTART (-1)

struct trb {
	uint64_t p;
	uint32_t s;
	uint32_t c;
};

static uint32_t bdf;
static uint64_t bar, tsc_per_ms;
static uint64_t cmd_enq, ev_deq;
static int cmd_cyc, ev_cyc;
static uint64_t ring_enq[9][5];
static int ring_cyc[9][5];
static unsigned kbd_slot, disk_slot, restarts;

__attribute__((noreturn)) static void fail(uint8_t code, const char *why, uint64_t value)
{
	print("usb: FAIL: %s (0x%lx)\n", why, value);
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

static uint32_t r32(uint64_t off) { return mmio_read32(bar + off); }
static void w32(uint64_t off, uint32_t v) { mmio_write32(bar + off, v); }
static void w64(uint64_t off, uint64_t v)
{
	w32(off, (uint32_t)v);
	w32(off + 4, (uint32_t)(v >> 32));
}
static volatile struct trb *at(uint64_t addr) { return (volatile struct trb *)addr; }

static void put_trb(uint64_t addr, uint64_t p, uint32_t s, uint32_t c)
{
	volatile struct trb *t = at(addr);
	t->p = p;
	t->s = s;
	barrier();
	t->c = c;
	mb();
}

static int find_device(void)
{
	for (unsigned slot = 0; slot < 32; slot++) {
		uint32_t b = PCI_BDF(0, slot, 0);
		if (pci_read16(b, PCI_VENDOR_ID) == 0xffff)
			continue;
		if ((pci_read32(b, 8) >> 8) == 0x0c0330) {
			bdf = b;
			return 1;
		}
	}
	return 0;
}

static void setup_msix(void)
{
	unsigned cap = pci_read8(bdf, PCI_CAP_PTR) & 0xfc;
	for (int n = 0; cap && n < 48 && pci_read8(bdf, cap) != PCI_CAP_ID_MSIX; n++)
		cap = pci_read8(bdf, cap + 1) & 0xfc;
	check(cap != 0, "no MSI-X capability", 0);
	uint32_t table = pci_read32(bdf, cap + 4);
	uint64_t entry = pci_bar_addr(bdf, table & 7) + (table & ~7u);
	mmio_write32(entry + 0, MSIX_ADDRESS);
	mmio_write32(entry + 4, 0);
	mmio_write32(entry + 8, VECTOR);
	mmio_write32(entry + 12, 0);
	pci_write16(bdf, cap + 2, (pci_read16(bdf, cap + 2) | 0x8000) & ~0x4000);
}

/* Waits until the controller answers again (a restarted isola-usb is a pause). */
static void wait_present(void)
{
	uint64_t t0 = now_ms();
	while (r32(OP + 4) == AWAY)
		check(now_ms() - t0 < 60000, "the controller never came back", 0);
}

static void init(void)
{
	wait_present();
	w32(OP, 2); /* HCRST */
	uint64_t t0 = now_ms();
	while ((r32(OP) & 2) || (r32(OP + 4) & (1u << 11)) || !(r32(OP + 4) & STS_HCH))
		check(now_ms() - t0 < 5000, "reset did not complete", r32(OP + 4));
	memset((void *)MEM, 0, CLEAR_LEN);
	w32(OP + 0x38, 8);
	w64(OP + 0x30, DCBAA);
	cmd_enq = CMD_RING;
	cmd_cyc = 1;
	put_trb(CMD_RING + (RING_TRBS - 1) * 16, CMD_RING, 0, (T_LINK << 10) | F_TC);
	w64(OP + 0x18, CMD_RING | 1);
	*(volatile uint64_t *)ERST = EVENT_RING;
	*(volatile uint32_t *)(ERST + 8) = EVENT_TRBS;
	ev_deq = EVENT_RING;
	ev_cyc = 1;
	w32(RT + 0x28, 1);
	w64(RT + 0x38, EVENT_RING);
	w64(RT + 0x30, ERST);
	w32(RT + 0x20, 2);
	w32(OP, 1 | 4);
	check(!(r32(OP + 4) & STS_HCH), "controller did not start", r32(OP + 4));
}

/* The next event within `ms`: 1 got one, 0 none, RESTART the controller went away or
 * reported Host System Error. */
static int next_event(struct trb *out, uint64_t ms)
{
	uint64_t t0 = now_ms();
	for (;;) {
		/* Taken before looking, so an interrupt for an event written after the look
		 * ends the wait below at once. */
		uint32_t seen = irq_total;
		volatile struct trb *e = at(ev_deq);
		if ((e->c & 1) == (uint32_t)ev_cyc) {
			out->p = e->p;
			out->s = e->s;
			out->c = e->c;
			ev_deq += 16;
			if (ev_deq == EVENT_RING + EVENT_TRBS * 16) {
				ev_deq = EVENT_RING;
				ev_cyc ^= 1;
			}
			w64(RT + 0x38, ev_deq | 8);
			return 1;
		}
		uint32_t sts = r32(OP + 4);
		if (sts == AWAY || (sts & STS_HSE))
			return RESTART;
		if (now_ms() - t0 >= ms)
			return 0;
		/* The MSI-X interrupt, or the periodic timer to look at the clock again. */
		sys_wait_irq(seen);
	}
}

/* Waits for an event of `type`; skips port status changes. */
static int wait_event(unsigned type, struct trb *out, uint64_t ms)
{
	for (;;) {
		int got = next_event(out, ms);
		if (got != 1)
			return got == 0 ? RESTART : got;
		if (((out->c >> 10) & 0x3f) == type)
			return 1;
	}
}

static int command(uint64_t p, uint32_t s, uint32_t c, struct trb *ev)
{
	uint64_t addr = cmd_enq;
	put_trb(addr, p, s, c | (uint32_t)cmd_cyc);
	cmd_enq += 16;
	if (cmd_enq == CMD_RING + (RING_TRBS - 1) * 16) {
		put_trb(cmd_enq, CMD_RING, 0, (T_LINK << 10) | F_TC | (uint32_t)cmd_cyc);
		cmd_enq = CMD_RING;
		cmd_cyc ^= 1;
	}
	w32(DB, 0);
	if (wait_event(T_COMPLETION, ev, 5000) != 1)
		return RESTART;
	check(ev->p == addr, "completion for another command", ev->p);
	return (int)(ev->s >> 24);
}

static void ring_init(unsigned slot, unsigned dci)
{
	uint64_t ring = RING(slot, dci);
	memset((void *)ring, 0, RING_TRBS * 16);
	put_trb(ring + (RING_TRBS - 1) * 16, ring, 0, (T_LINK << 10) | F_TC);
	ring_enq[slot][dci] = ring;
	ring_cyc[slot][dci] = 1;
}

static void queue(unsigned slot, unsigned dci, uint64_t p, uint32_t s, uint32_t c)
{
	uint64_t ring = RING(slot, dci), addr = ring_enq[slot][dci];
	int cyc = ring_cyc[slot][dci];
	put_trb(addr, p, s, c | (uint32_t)cyc);
	addr += 16;
	if (addr == ring + (RING_TRBS - 1) * 16) {
		put_trb(addr, ring, 0, (T_LINK << 10) | F_TC | (uint32_t)cyc);
		addr = ring;
		cyc ^= 1;
	}
	ring_enq[slot][dci] = addr;
	ring_cyc[slot][dci] = cyc;
}

static int reset_port(unsigned port)
{
	uint64_t off = OP + 0x400 + 0x10 * (port - 1);
	uint32_t sc = r32(off);
	if (sc == AWAY || !(sc & 1))
		return RESTART;
	w32(off, (sc & 0x0e00c3e0u) | (1u << 4) | (0x7fu << 17));
	uint64_t t0 = now_ms();
	while (!(r32(off) & 2))
		if (now_ms() - t0 > 2000)
			return RESTART;
	return 1;
}

/* A control transfer with `len` bytes of IN data into DATA (or none): completion code. */
static int control(unsigned slot, uint64_t setup, unsigned len)
{
	uint32_t trt = len ? (3u << 16) : 0;
	queue(slot, 1, setup, 8, (T_SETUP << 10) | F_IDT | trt);
	if (len)
		queue(slot, 1, DATA, len, (T_DATA << 10) | DIR_IN | F_ISP);
	queue(slot, 1, 0, 0, (T_STATUS << 10) | F_IOC | (len ? 0 : DIR_IN));
	w32(DB + 4 * slot, 1);
	struct trb ev;
	for (;;) {
		if (wait_event(T_TRANSFER, &ev, 5000) != 1)
			return RESTART;
		unsigned cc = ev.s >> 24;
		if (cc != CC_SHORT)
			return (int)cc;
	}
}

static int attach(unsigned port, unsigned mp, unsigned *slot_out)
{
	struct trb ev;
	if (reset_port(port) != 1)
		return RESTART;
	int cc = command(0, 0, T_ENABLE_SLOT << 10, &ev);
	if (cc != CC_SUCCESS)
		return RESTART;
	unsigned slot = ev.c >> 24;
	check(slot >= 1 && slot <= 8, "slot id", slot);
	*(volatile uint64_t *)(DCBAA + 8 * slot) = OUT_CTX(slot);
	volatile uint32_t *in = (volatile uint32_t *)INPUT_CTX;
	memset((void *)INPUT_CTX, 0, 0x420);
	uint32_t speed = (r32(OP + 0x400 + 0x10 * (port - 1)) >> 10) & 0xf;
	in[1] = 3;
	in[8] = (1u << 27) | (speed << 20);
	in[9] = port << 16;
	ring_init(slot, 1);
	in[17] = (3u << 1) | (4u << 3) | (mp << 16);
	*(volatile uint64_t *)(INPUT_CTX + 72) = RING(slot, 1) | 1;
	if (command(INPUT_CTX, 0, (T_ADDRESS << 10) | (slot << 24), &ev) != CC_SUCCESS)
		return RESTART;
	if (control(slot, 0x0012000001000680ull, 18) != CC_SUCCESS)
		return RESTART;
	check(peek8(DATA) == 18 && peek8(DATA + 1) == 1, "device descriptor", peek32(DATA));
	print("usb: port %u device usb=%04x ep0=%u vendor=%04x product=%04x configs=%u\n", port,
	      peek16(DATA + 2), peek8(DATA + 7), peek16(DATA + 8), peek16(DATA + 10), peek8(DATA + 17));
	/* The configuration's header for its length, then all of it. */
	if (control(slot, 0x0009000002000680ull, 9) != CC_SUCCESS)
		return RESTART;
	check(peek8(DATA + 1) == 2, "configuration descriptor type", peek8(DATA + 1));
	unsigned total = peek16(DATA + 2);
	check(total >= 18 && total <= 256, "configuration length", total);
	if (control(slot, 0x0000000002000680ull | (uint64_t)total << 48, total) != CC_SUCCESS)
		return RESTART;
	unsigned eps = 0, ep_addr[4] = {0}, ep_attr[4] = {0}, ep_mp[4] = {0};
	unsigned iface = 0;
	for (unsigned off = 0; off + 2 <= total && peek8(DATA + off) >= 2; off += peek8(DATA + off)) {
		unsigned type = peek8(DATA + off + 1);
		if (type == 4)
			iface = off;
		if (type == 5 && eps < 4) {
			ep_addr[eps] = peek8(DATA + off + 2);
			ep_attr[eps] = peek8(DATA + off + 3);
			ep_mp[eps] = peek16(DATA + off + 4);
			eps++;
		}
	}
	check(iface != 0, "no interface descriptor", total);
	print("usb: port %u config total=%u interfaces=%u interface=%02x/%02x/%02x endpoints=%u",
	      port, total, peek8(DATA + 4), peek8(DATA + iface + 5), peek8(DATA + iface + 6),
	      peek8(DATA + iface + 7), eps);
	for (unsigned i = 0; i < eps; i++)
		print(" %02x:%u:%u", ep_addr[i], ep_attr[i], ep_mp[i]);
	print("\n");
	if (control(slot, 0x0000000000010900ull, 0) != CC_SUCCESS)
		return RESTART;
	*slot_out = slot;
	return 1;
}

/* Configure Endpoint with one (dci, type, max packet) or two. */
static int configure(unsigned slot, unsigned n, const unsigned (*eps)[3])
{
	struct trb ev;
	memset((void *)INPUT_CTX, 0, 0x420);
	volatile uint32_t *in = (volatile uint32_t *)INPUT_CTX;
	uint32_t add = 1, last = 1;
	for (unsigned i = 0; i < n; i++) {
		unsigned dci = eps[i][0];
		add |= 1u << dci;
		last = dci > last ? dci : last;
		ring_init(slot, dci);
		volatile uint32_t *ep = in + 8 * (dci + 1);
		ep[1] = (3u << 1) | (eps[i][1] << 3) | (eps[i][2] << 16);
		*(volatile uint64_t *)(ep + 2) = RING(slot, dci) | 1;
	}
	in[1] = add;
	in[8] = last << 27;
	return command(INPUT_CTX, 0, (T_CONFIGURE << 10) | (slot << 24), &ev) == CC_SUCCESS ? 1 : RESTART;
}

static int enumerate(void)
{
	static const unsigned kbd[1][3] = {{3, 7, 8}};
	static const unsigned disk[2][3] = {{3, 6, 1024}, {4, 2, 1024}};
	if (attach(1, 64, &kbd_slot) != 1 || configure(kbd_slot, 1, kbd) != 1)
		return RESTART;
	if (attach(3, 512, &disk_slot) != 1 || configure(disk_slot, 2, disk) != 1)
		return RESTART;
	return 1;
}

/* One Normal TRB on `dci` of the disk; residue in *left. */
static int bulk(unsigned dci, uint64_t buf, uint32_t len, uint32_t *left)
{
	struct trb ev;
	queue(disk_slot, dci, buf, len, (T_NORMAL << 10) | F_IOC | (dci & 1 ? F_ISP : 0));
	w32(DB + 4 * disk_slot, dci);
	if (wait_event(T_TRANSFER, &ev, 5000) != 1)
		return RESTART;
	unsigned cc = ev.s >> 24;
	if (cc != CC_SUCCESS && cc != CC_SHORT)
		return RESTART;
	*left = ev.s & 0xffffff;
	return 1;
}

/* One SCSI command with `len` bytes of data at SECTOR_BUF: CSW status or RESTART. */
static int scsi(uint32_t tag, const uint8_t *cdb, unsigned cdb_len, int in, uint32_t len)
{
	volatile uint8_t *cbw = (volatile uint8_t *)DATA;
	uint32_t left;
	for (unsigned i = 0; i < 31; i++)
		cbw[i] = 0;
	cbw[0] = 'U'; cbw[1] = 'S'; cbw[2] = 'B'; cbw[3] = 'C';
	for (unsigned i = 0; i < 4; i++) {
		cbw[4 + i] = (uint8_t)(tag >> (8 * i));
		cbw[8 + i] = (uint8_t)(len >> (8 * i));
	}
	cbw[12] = in ? 0x80 : 0;
	cbw[14] = (uint8_t)cdb_len;
	for (unsigned i = 0; i < cdb_len; i++)
		cbw[15 + i] = cdb[i];
	if (bulk(4, DATA, 31, &left) != 1)
		return RESTART;
	if (len && bulk(in ? 3 : 4, SECTOR_BUF, len, &left) != 1)
		return RESTART;
	if (bulk(3, DATA + 64, 13, &left) != 1 || left != 0)
		return RESTART;
	check(peek32(DATA + 64) == 0x53425355u && peek32(DATA + 68) == tag, "CSW", peek32(DATA + 68));
	return peek8(DATA + 76);
}

static void recover(const char *where)
{
	print("usb: controller lost (%s, usbsts=0x%x); resetting\n", where, r32(OP + 4));
	restarts++;
	check(restarts < 8, "too many restarts", restarts);
	for (;;) {
		init();
		if (enumerate() == 1)
			break;
		print("usb: enumeration interrupted; again\n");
	}
	print("usb: enumerated again after restart %u\n", restarts);
}

static uint8_t pattern(uint32_t lba, uint32_t i)
{
	return (uint8_t)(i * 7 + lba * 13 + (lba >> 8));
}

static int rw(int write, uint32_t lba, uint32_t tag)
{
	uint8_t cdb[10] = {write ? 0x2a : 0x28, 0, (uint8_t)(lba >> 24), (uint8_t)(lba >> 16),
			   (uint8_t)(lba >> 8), (uint8_t)lba, 0, 0, 1, 0};
	return scsi(tag, cdb, 10, !write, 512);
}

static void storage(uint32_t sectors)
{
	uint8_t cap[10] = {0x25};
	int status;
	while ((status = scsi(1, cap, 10, 1, 8)) == RESTART)
		recover("read capacity");
	check(status == 0, "read capacity status", (uint64_t)status);
	uint32_t last = (uint32_t)peek8(SECTOR_BUF) << 24 | (uint32_t)peek8(SECTOR_BUF + 1) << 16 |
			(uint32_t)peek8(SECTOR_BUF + 2) << 8 | peek8(SECTOR_BUF + 3);
	print("usb: disk blocks=%u\n", last + 1);
	check(last + 1 > sectors, "disk too small", last);
	volatile uint8_t *buf = (volatile uint8_t *)SECTOR_BUF;
	/* Block 0 holds what the host wrote into the image before the guest started. */
	for (;;) {
		memset((void *)SECTOR_BUF, 0, 512);
		int st = rw(0, 0, 0x7fff);
		if (st == RESTART) {
			recover("read block 0");
			continue;
		}
		check(st == 0, "read status of block 0", st);
		break;
	}
	print("usb: block 0 crc=%08x starts %02x %02x %02x %02x\n", crc32(buf, 512), buf[0], buf[1],
	      buf[2], buf[3]);
	for (uint32_t lba = 1; lba <= sectors;) {
		for (uint32_t i = 0; i < 512; i++)
			buf[i] = pattern(lba, i);
		int st = rw(1, lba, 0x1000 + lba);
		if (st == RESTART) {
			recover("write");
			continue; /* not acknowledged: write it again */
		}
		check(st == 0, "write status", st);
		if (lba % 100 == 0)
			print("usb: wrote %u\n", lba);
		lba++;
	}
	for (uint32_t lba = 1; lba <= sectors;) {
		memset((void *)SECTOR_BUF, 0, 512);
		int st = rw(0, lba, 0x8000 + lba);
		if (st == RESTART) {
			recover("read");
			continue;
		}
		check(st == 0, "read status", st);
		for (uint32_t i = 0; i < 512; i++)
			check(buf[i] == pattern(lba, i), "sector content", lba);
		lba++;
	}
	print("usb: verified %u sectors restarts=%u\n", sectors, restarts);
}

/* Bench mode: random 4 KiB READ(10)s, one at a time, for `ms` milliseconds. */
static void bench(uint64_t ms)
{
	uint8_t cap[10] = {0x25};
	int status = scsi(1, cap, 10, 1, 8);
	check(status == 0, "read capacity status", (uint64_t)status);
	uint32_t blocks = ((uint32_t)peek8(SECTOR_BUF) << 24 | (uint32_t)peek8(SECTOR_BUF + 1) << 16 |
			   (uint32_t)peek8(SECTOR_BUF + 2) << 8 | peek8(SECTOR_BUF + 3)) + 1;
	uint32_t chunks = blocks / 8;
	check(chunks > 0, "disk too small for bench mode", blocks);
	print("usb: bench start ms=%lu blocks=%u\n", ms, blocks);
	uint64_t rng = 0x9e3779b97f4a7c15ull, reads = 0, start = now_ms(), now = start;
	while (now - start < ms) {
		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		uint32_t lba = (uint32_t)(rng % chunks) * 8;
		uint8_t cdb[10] = {0x28, 0, (uint8_t)(lba >> 24), (uint8_t)(lba >> 16),
				   (uint8_t)(lba >> 8), (uint8_t)lba, 0, 0, 8, 0};
		int st = scsi(0x10000 + (uint32_t)reads, cdb, 10, 1, 4096);
		check(st != RESTART, "controller lost during the bench", reads);
		check(st == 0, "bench read status", (uint64_t)st);
		for (uint32_t k = 0; k < 8; k++)
			check(*(volatile uint64_t *)(SECTOR_BUF + 512 * k) == lba + k,
			      "bench read returned another block", lba + k);
		reads++;
		now = now_ms();
	}
	uint64_t elapsed = now - start;
	print("usb: bench reads=%lu ms=%lu iops=%lu\n", reads, elapsed,
	      elapsed ? reads * 1000 / elapsed : 0);
}

/* Reads `count` key reports from the keyboard's interrupt endpoint. */
static void keys(unsigned count, const char *phase)
{
	print("usb: keyboard ready %s\n", phase);
	for (unsigned n = 0; n < count;) {
		memset((void *)(DATA + 0x100), 0, 8);
		queue(kbd_slot, 3, DATA + 0x100, 8, (T_NORMAL << 10) | F_IOC | F_ISP);
		w32(DB + 4 * kbd_slot, 3);
		struct trb ev;
		int got = wait_event(T_TRANSFER, &ev, 120000);
		if (got != 1) {
			recover("keyboard");
			print("usb: keyboard ready %s\n", phase);
			continue;
		}
		check((ev.s >> 24) == CC_SUCCESS || (ev.s >> 24) == CC_SHORT, "report", ev.s);
		print("usb: report %s %02x %02x %02x %02x\n", phase, peek8(DATA + 0x100),
		      peek8(DATA + 0x102), peek8(DATA + 0x103), peek8(DATA + 0x104));
		n++;
	}
}

void guest_main(void)
{
	uint64_t sectors = 1000, nkeys = 4, ms = 3000;
	char mode[8] = "test";
	cmdline_u64("usb.sectors", &sectors);
	cmdline_u64("usb.keys", &nkeys);
	cmdline_u64("usb.ms", &ms);
	cmdline_get("usb.mode", mode, sizeof(mode));
	int bench_mode = str_eq(mode, "bench");
	check(bench_mode || str_eq(mode, "test"), "usb.mode is test or bench", 0);
	print("usb: start mode=%s sectors=%lu\n", mode, sectors);
	lapic_enable();
	tsc_per_ms = tsc_hz() / 1000;
	if (!find_device())
		fail(EXIT_NO_DEVICE, "no xHCI controller", 0);
	pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	bar = pci_bar_addr(bdf, 0);
	check(bar != 0, "BAR 0 unassigned", 0);
	setup_msix();
	print("usb: found slot=%u bar0=0x%lx caplength=0x%x ports=%u\n", (bdf >> 3) & 31, bar,
	      r32(0) & 0xff, r32(4) >> 24);
	/* A periodic timer (16 ms), so waiting for the MSI-X interrupt always wakes up to look
	 * at the clock. */
	lapic_timer_periodic(TIMER_VECTOR, 1000000);
	init();
	print("usb: running usbsts=0x%x\n", r32(OP + 4));
	unsigned ports = r32(4) >> 24;
	for (unsigned port = 1; port <= ports; port++) {
		uint32_t sc = r32(OP + 0x400 + 0x10 * (port - 1));
		print("usb: port %u portsc=0x%08x connected=%u speed=%u\n", port, sc, sc & 1,
		      (sc >> 10) & 0xf);
	}
	while (enumerate() != 1)
		recover("enumerate");
	/* Each event came with an interrupt; one may still wait in the LAPIC if every event
	 * was already in memory when the driver looked. */
	for (uint64_t t0 = now_ms(); irq_counts[VECTOR] == 0 && now_ms() - t0 < 1000;)
		sys_wait_irq(irq_total);
	print("usb: enumerated keyboard=%u disk=%u irqs=%u\n", kbd_slot, disk_slot, irq_counts[VECTOR]);
	check(irq_counts[VECTOR] > 0, "no MSI-X interrupt", 0);
	if (bench_mode) {
		bench(ms);
		print("usb: ok\n");
		poweroff();
	}
	keys((unsigned)nkeys, "before");
	storage((uint32_t)sectors);
	keys((unsigned)nkeys, "after");
	print("usb: ok restarts=%u\n", restarts);
	poweroff();
}
