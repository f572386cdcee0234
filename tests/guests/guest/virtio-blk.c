/*
 * virtio-blk: drives the first virtio-blk PCI function (0x1af4:0x1042) on bus 0 through one
 * split virtqueue with MSI-X completions, in one of three modes chosen on the command line:
 *
 *   normal   writes a (sector, seed) pattern to sectors [0, sectors), flushes, reads it all
 *            back and verifies every byte, asks for the device id, powers off;
 *   verify   only reads [0, sectors) and verifies it against the pattern for `seed`;
 *   hostile  sends malformed requests one at a time, each followed by a valid write + read
 *            that must still work;
 *   loop     write + read + verify cycles over [0, sectors) with a new generation each cycle,
 *            printing progress, for a number of cycles or seconds (or forever);
 *   bench    reads of `req` sectors at random `req`-aligned sectors across the whole disk,
 *            `depth` in flight, for `ms` milliseconds; each sector read must start with its
 *            own number (the host prepares the image so); prints the rate.
 *
 * The output protocol, parameters and exit codes are documented in ../src/lib.rs.
 */
#include "virtio.h"

#define BLK_PCI_DEVICE      (VIRTIO_PCI_DEVICE_BASE + 2)

#define VIRTIO_BLK_F_RO     5
#define VIRTIO_BLK_F_FLUSH  9
#define VIRTIO_BLK_F_MQ     12
#define BLK_CFG_NUM_QUEUES  34          /* u16 in struct virtio_blk_config */

#define T_IN                0
#define T_OUT               1
#define T_FLUSH             4
#define T_GET_ID            8
#define T_UNKNOWN           0x7e57      /* no such request type */
#define S_OK                0
#define S_IOERR             1
#define S_UNSUPP            2
#define S_UNWRITTEN         0xff        /* what the status byte holds until the device writes */
#define ID_BYTES            20

#define SECTOR              512
#define SECTOR_MAGIC        0x626f7369u /* "isob" */
#define QUEUE_MAX           128
#define MAX_DEPTH           128
#define MAX_REQ_SECTORS     16

/* MSI-X table entries and the IDT vectors they raise. */
#define MSIX_CONFIG         0
#define MSIX_QUEUE          1
#define CONFIG_VECTOR       0x41
#define QUEUE_VECTOR        0x40

#define EXIT_NO_DEVICE      10
#define EXIT_BAD_CAPS       11
#define EXIT_FEATURES       12
#define EXIT_QUEUE_SETUP    13
#define EXIT_BAD_PARAM      14
#define EXIT_IO_ERROR       15
#define EXIT_MISMATCH       16
#define EXIT_TIMEOUT        17
#define EXIT_HOSTILE        18
#define EXIT_PROTOCOL       19

/* An address no guest RAM can be at (moved up if the memory map says otherwise). */
#define BAD_ADDR_DEFAULT    0x300000000ull
/* How long a hostile request may stay unanswered before it counts as dropped. */
#define HOSTILE_WAIT_MS     2000

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* One request slot: its header and status (what the device sees) and our bookkeeping. In
 * direct mode slot i owns descriptors 3i..3i+2; with indirect descriptors it owns descriptor
 * i and the table indirect[i]. */
struct slot {
	struct blk_hdr hdr;
	volatile uint8_t status;
	uint8_t busy;
	uint8_t retired;        /* hostile: never answered; never reused */
	uint32_t type;
	uint64_t sector;
	uint32_t count;
	uint64_t gen;
};

static uint8_t queue_mem[VIRTQ_BYTES(QUEUE_MAX)] __attribute__((aligned(4096)));
static struct slot slots[MAX_DEPTH] __attribute__((aligned(64)));
static struct virtq_desc indirect[MAX_DEPTH][3] __attribute__((aligned(16)));
static uint8_t data[MAX_DEPTH][MAX_REQ_SECTORS * SECTOR] __attribute__((aligned(4096)));
static uint8_t expect[SECTOR] __attribute__((aligned(8)));

static struct virtio_pci_dev dev;
static struct virtq q;
static uint64_t capacity;
static unsigned nslots, depth, req_sectors;
static int use_indirect;
static uint16_t free_stack[MAX_DEPTH];
static unsigned nfree;
static uint64_t timeout_cycles;
static uint64_t requests;

/* Lowest sector that failed verification in the current pass, and how many did. */
static uint64_t bad_first, bad_count;

static __attribute__((noreturn)) void die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("virtio-blk: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	if (dev.common)
		virtio_fail(&dev);
	debug_exit(code);
}

/* ---- The data pattern (src/lib.rs documents it; the tests compute it independently) ---- */

static uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Sector contents for generation `gen`: sector number, generation, 61 pattern words, magic,
 * CRC-32 of the 508 bytes before it. Self-describing, so any sector can be checked alone. */
static void make_sector(uint8_t *out, uint64_t sector, uint64_t gen)
{
	uint64_t *w = (uint64_t *)out;
	w[0] = sector;
	w[1] = gen;
	for (unsigned i = 2; i < 63; i++)
		w[i] = mix64(gen * 0x9e3779b97f4a7c15ull + sector * 64 + i);
	uint32_t *tail = (uint32_t *)(out + 504);
	tail[0] = SECTOR_MAGIC;
	tail[1] = crc32(out, 508);
}

static void verify_sectors(const uint8_t *buf, uint64_t sector, uint32_t count, uint64_t gen)
{
	for (uint32_t k = 0; k < count; k++) {
		make_sector(expect, sector + k, gen);
		const uint64_t *a = (const uint64_t *)(buf + (uint64_t)k * SECTOR);
		const uint64_t *b = (const uint64_t *)expect;
		for (unsigned i = 0; i < SECTOR / 8; i++) {
			if (a[i] != b[i]) {
				if (!bad_count || sector + k < bad_first)
					bad_first = sector + k;
				bad_count++;
				break;
			}
		}
	}
}

/* ---- Requests ---- */

static const char *status_name(uint8_t s)
{
	switch (s) {
	case S_OK:
		return "ok";
	case S_IOERR:
		return "ioerr";
	case S_UNSUPP:
		return "unsupp";
	case S_UNWRITTEN:
		return "unwritten";
	default:
		return "other";
	}
}

static unsigned take_slot(void)
{
	if (!nfree)
		die(EXIT_HOSTILE, "out of request slots");
	unsigned i = free_stack[--nfree];
	slots[i].busy = 1;
	return i;
}

static void put_slot(unsigned i)
{
	slots[i].busy = 0;
	free_stack[nfree++] = (uint16_t)i;
}

static uint16_t slot_head(unsigned i)
{
	return (uint16_t)(use_indirect ? i : 3 * i);
}

/* Queues a request of `type` on slot i: header, then (if len) the data buffer, then status. */
static void submit(unsigned i, uint32_t type, uint64_t sector, uint32_t len, uint64_t gen)
{
	struct slot *s = &slots[i];
	s->hdr.type = type;
	s->hdr.reserved = 0;
	s->hdr.sector = sector;
	s->status = S_UNWRITTEN;
	s->type = type;
	s->sector = sector;
	s->count = len / SECTOR;
	s->gen = gen;
	uint16_t data_flags = type == T_OUT ? 0 : VIRTQ_DESC_F_WRITE;
	uint64_t hdr = (uint64_t)&s->hdr, status = (uint64_t)&s->status;
	uint64_t buf = (uint64_t)data[i];

	if (use_indirect) {
		struct virtq_desc *t = indirect[i];
		unsigned n = 0;
		t[n] = (struct virtq_desc){ hdr, sizeof(s->hdr), VIRTQ_DESC_F_NEXT, (uint16_t)(n + 1) };
		n++;
		if (len) {
			t[n] = (struct virtq_desc){ buf, len, data_flags | VIRTQ_DESC_F_NEXT,
						    (uint16_t)(n + 1) };
			n++;
		}
		t[n] = (struct virtq_desc){ status, 1, VIRTQ_DESC_F_WRITE, 0 };
		n++;
		virtq_set_desc(&q, (uint16_t)i, (uint64_t)t, n * sizeof(*t), VIRTQ_DESC_F_INDIRECT, 0);
	} else {
		uint16_t a = (uint16_t)(3 * i), b = a + 1, c = a + 2;
		virtq_set_desc(&q, a, hdr, sizeof(s->hdr), VIRTQ_DESC_F_NEXT, len ? b : c);
		if (len)
			virtq_set_desc(&q, b, buf, len, data_flags | VIRTQ_DESC_F_NEXT, c);
		virtq_set_desc(&q, c, status, 1, VIRTQ_DESC_F_WRITE, 0);
	}
	virtq_add(&q, slot_head(i));
	requests++;
}

/* Maps a used id back to its slot; anything that is not a head we handed out is fatal. */
static unsigned used_slot(uint32_t id)
{
	unsigned i = use_indirect ? id : id / 3;
	if (id >= q.size || (!use_indirect && id % 3) || i >= nslots || !slots[i].busy)
		die(EXIT_PROTOCOL, "device returned descriptor %u, which is not in flight", id);
	return i;
}

static uint64_t deadline(uint64_t cycles)
{
	return rdtsc() + cycles;
}

/* Hostile mode: the case whose follow-up request is being waited for. */
static const char *hostile_case;

/* The longest wait for a completion since the last loop progress line, in TSC cycles: the
 * pause the guest sees when its device stalls (a restart or upgrade of the device process). */
static uint64_t max_wait;

static void wait_used(void)
{
	uint64_t before = rdtsc();
	if (virtq_wait(&q, deadline(timeout_cycles))) {
		uint64_t waited = rdtsc() - before;
		if (waited > max_wait)
			max_wait = waited;
		return;
	}
	if (hostile_case)
		die(EXIT_HOSTILE, "hostile %s: valid request afterwards got no answer (status=0x%x)",
		    hostile_case, virtio_status(&dev));
	die(EXIT_TIMEOUT, "timeout: no completion within the time limit (%lu requests in flight)",
		    (unsigned long)(nslots - nfree));
}

/* Handles one completion of the normal data path: status, and verification for reads.
 * Completions of retired (hostile, dropped) slots are let go. */
static void complete(uint32_t id)
{
	unsigned i = used_slot(id);
	struct slot *s = &slots[i];
	if (s->retired) {
		print("virtio-blk: late completion of a dropped request, status=%s\n",
		      status_name(s->status));
		s->busy = 0;
		return;
	}
	if (s->status != S_OK)
		die(EXIT_IO_ERROR, "request failed: type=%u sector=%lu status=%u (%s)", s->type,
		    s->sector, s->status, status_name(s->status));
	if (s->type == T_IN)
		verify_sectors(data[i], s->sector, s->count, s->gen);
	put_slot(i);
}

/* One pass over sectors [0, nsec): `type` T_OUT writes generation gen, T_IN reads and checks
 * it; up to `depth` requests in flight. */
static void run_pass(uint32_t type, uint64_t nsec, uint64_t gen)
{
	uint64_t next = 0;
	unsigned inflight = 0;
	bad_count = 0;
	while (next < nsec || inflight) {
		while (inflight < depth && next < nsec) {
			uint32_t count = nsec - next < req_sectors ? (uint32_t)(nsec - next) : req_sectors;
			unsigned i = take_slot();
			if (type == T_OUT)
				for (uint32_t k = 0; k < count; k++)
					make_sector(data[i] + k * SECTOR, next + k, gen);
			submit(i, type, next, count * SECTOR, gen);
			inflight++;
			next += count;
		}
		virtq_kick(&q);
		wait_used();
		uint32_t id, len;
		while (virtq_pop(&q, &id, &len)) {
			complete(id);
			inflight--;
		}
	}
	if (bad_count)
		die(EXIT_MISMATCH, "verify failed: first bad sector=%lu (%lu bad sectors)", bad_first,
		    bad_count);
}

/* Bench mode: random reads of req_sectors at req_sectors-aligned sectors over the whole disk,
 * up to `depth` in flight, for `ms` milliseconds. The host wrote each sector's number into its
 * first 8 bytes; a sector that does not start with its own number fails the run. */
static void bench(uint64_t ms, uint64_t seed)
{
	uint64_t hz = tsc_hz(), chunks = capacity / req_sectors, rng = seed * 0x9e3779b97f4a7c15ull + 1;
	uint64_t reads = 0, start = rdtsc(), end = start + hz / 1000 * ms, now = start;
	unsigned inflight = 0;
	if (!chunks)
		die(EXIT_BAD_PARAM, "disk too small for bench mode (%lu sectors)", capacity);
	print("virtio-blk: bench start ms=%lu chunks=%lu\n", ms, chunks);
	while (now < end || inflight) {
		while (inflight < depth && now < end) {
			rng ^= rng << 13;
			rng ^= rng >> 7;
			rng ^= rng << 17;
			unsigned i = take_slot();
			submit(i, T_IN, rng % chunks * req_sectors, req_sectors * SECTOR, 0);
			inflight++;
		}
		virtq_kick(&q);
		wait_used();
		uint32_t id, len;
		while (virtq_pop(&q, &id, &len)) {
			unsigned i = used_slot(id);
			struct slot *s = &slots[i];
			if (s->status != S_OK)
				die(EXIT_IO_ERROR, "bench read failed: sector=%lu status=%u (%s)",
				    s->sector, s->status, status_name(s->status));
			for (uint32_t k = 0; k < s->count; k++)
				if (*(uint64_t *)(data[i] + k * SECTOR) != s->sector + k)
					die(EXIT_MISMATCH, "bench read of sector %lu returned sector %lu",
					    s->sector + k, *(uint64_t *)(data[i] + k * SECTOR));
			put_slot(i);
			inflight--;
			reads++;
		}
		now = rdtsc();
	}
	uint64_t elapsed_ms = (now - start) / (hz / 1000);
	print("virtio-blk: bench reads=%lu ms=%lu iops=%lu\n", reads, elapsed_ms,
	      elapsed_ms ? reads * 1000 / elapsed_ms : 0);
}

/* A single request on slot i (taken), waited for; returns i for the caller to inspect. */
static unsigned single_on(unsigned i, uint32_t type, uint64_t sector, uint32_t len)
{
	submit(i, type, sector, len, 0);
	virtq_kick(&q);
	uint32_t id, len_used;
	for (;;) {
		wait_used();
		while (virtq_pop(&q, &id, &len_used)) {
			unsigned j = used_slot(id);
			if (j == i)
				return i;
			if (!slots[j].retired)
				die(EXIT_PROTOCOL, "unexpected completion of descriptor %u", id);
			print("virtio-blk: late completion of a dropped request, status=%s\n",
			      status_name(slots[j].status));
			slots[j].busy = 0;
		}
	}
}

static unsigned single(uint32_t type, uint64_t sector, uint32_t len)
{
	return single_on(take_slot(), type, sector, len);
}

static void flush(void)
{
	unsigned i = single(T_FLUSH, 0, 0);
	if (slots[i].status != S_OK)
		die(EXIT_IO_ERROR, "flush failed: status=%u (%s)", slots[i].status,
		    status_name(slots[i].status));
	put_slot(i);
	print("virtio-blk: flushed\n");
}

static void get_id(void)
{
	unsigned i = single(T_GET_ID, 0, ID_BYTES);
	uint8_t st = slots[i].status;
	if (st != S_OK) {
		print("virtio-blk: id unavailable status=%u (%s)\n", st, status_name(st));
	} else {
		serial_puts("virtio-blk: id=");
		for (unsigned k = 0; k < ID_BYTES && data[i][k]; k++) {
			uint8_t c = data[i][k];
			serial_putc(c >= 0x20 && c < 0x7f ? (char)c : '?');
		}
		serial_putc('\n');
	}
	put_slot(i);
}

/* ---- Hostile mode ---- */

static uint64_t bad_addr;

/* Writes and reads back sectors [0, 8) with a fresh generation; dies if the device no longer
 * serves valid requests correctly. */
static void hostile_check(const char *after, uint64_t gen)
{
	hostile_case = after;
	unsigned w = take_slot();
	for (uint32_t k = 0; k < 8; k++)
		make_sector(data[w] + k * SECTOR, k, gen);
	single_on(w, T_OUT, 0, 8 * SECTOR);
	if (slots[w].status != S_OK)
		die(EXIT_HOSTILE, "hostile %s: valid write afterwards failed, status=%u", after,
		    slots[w].status);
	put_slot(w);
	unsigned r = take_slot();
	memset(data[r], 0, 8 * SECTOR);
	single_on(r, T_IN, 0, 8 * SECTOR);
	if (slots[r].status != S_OK)
		die(EXIT_HOSTILE, "hostile %s: valid read afterwards failed, status=%u", after,
		    slots[r].status);
	bad_count = 0;
	verify_sectors(data[r], 0, 8, gen);
	if (bad_count)
		die(EXIT_HOSTILE, "hostile %s: valid read afterwards returned wrong data (sector %lu)",
		    after, bad_first);
	put_slot(r);
	hostile_case = 0;
}

/* What a case may get back: anything (memory outside RAM may read as zeros on some platforms,
 * making the request valid), anything but OK, or one exact status. Dropping is always fine. */
enum hostile_expect { EXPECT_ANY, EXPECT_NOT_OK, EXPECT_IOERR, EXPECT_UNSUPP };

/* Submits the chain starting at slot i's first descriptor (already filled in), waits a
 * bounded time, reports, and checks the outcome. */
static void hostile_run(const char *name, unsigned i, enum hostile_expect want, uint64_t gen)
{
	virtq_add(&q, slot_head(i));
	requests++;
	virtq_kick(&q);
	uint64_t end = deadline(tsc_hz() / 1000 * HOSTILE_WAIT_MS);
	int answered = 0;
	uint32_t id, len = 0;
	while (!answered && virtq_wait(&q, end)) {
		while (virtq_pop(&q, &id, &len)) {
			unsigned j = used_slot(id);
			if (j == i) {
				answered = 1;
				break;
			}
			if (!slots[j].retired)
				die(EXIT_PROTOCOL, "unexpected completion of descriptor %u", id);
			slots[j].busy = 0;
		}
	}
	if (!answered) {
		print("virtio-blk: hostile %s: dropped\n", name);
		slots[i].retired = 1;    /* its descriptors may still be in the device's hands */
	} else {
		uint8_t st = slots[i].status;
		print("virtio-blk: hostile %s: status=%u (%s) len=%u\n", name, st, status_name(st),
		      len);
		int good = want == EXPECT_ANY || (want == EXPECT_IOERR && st == S_IOERR) ||
			   (want == EXPECT_UNSUPP && st == S_UNSUPP) ||
			   (want == EXPECT_NOT_OK && st != S_OK);
		if (!good)
			die(EXIT_HOSTILE, "hostile %s: expected %s", name,
			    want == EXPECT_IOERR ? "ioerr" : want == EXPECT_UNSUPP ? "unsupp" :
			    "an error or no answer");
		put_slot(i);
	}
	hostile_check(name, gen);
}

/* Fills slot i's three descriptors: header (hdr_addr, hdr_len), data (data_addr, 512,
 * device-writable), status; `loop` makes the status descriptor point back at the data one. */
static unsigned hostile_chain(uint32_t type, uint64_t sector, uint64_t hdr_addr, uint32_t hdr_len,
			      uint64_t data_addr, int loop)
{
	unsigned i = take_slot();
	struct slot *s = &slots[i];
	s->hdr = (struct blk_hdr){ type, 0, sector };
	s->status = S_UNWRITTEN;
	s->type = type;
	uint16_t a = (uint16_t)(3 * i), b = a + 1, c = a + 2;
	if (!hdr_addr)
		hdr_addr = (uint64_t)&s->hdr;
	if (!data_addr)
		data_addr = (uint64_t)data[i];
	virtq_set_desc(&q, a, hdr_addr, hdr_len, VIRTQ_DESC_F_NEXT, b);
	virtq_set_desc(&q, b, data_addr, SECTOR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, c);
	virtq_set_desc(&q, c, (uint64_t)&s->status, 1,
		       VIRTQ_DESC_F_WRITE | (loop ? VIRTQ_DESC_F_NEXT : 0), loop ? b : 0);
	return i;
}

/* Comma-separated case names from virtio-blk.cases ("all" if absent). */
static char cases[256];

static int case_selected(const char *name)
{
	if (str_eq(cases, "all"))
		return 1;
	for (const char *p = cases; *p;) {
		unsigned n = 0;
		while (name[n] && p[n] == name[n])
			n++;
		if (!name[n] && (p[n] == ',' || p[n] == 0))
			return 1;
		while (*p && *p != ',')
			p++;
		if (*p == ',')
			p++;
	}
	return 0;
}

static const char *const case_names[] = {
	"header-outside-ram", "data-outside-ram", "short-header", "read-past-end",
	"unknown-type", "looped-chain", "wrapping-status", "readable-data",
};

/* Low memory a status byte would land on if a device wrapped 0xFFFF_FFFF_FFFF_FFF8 + 15 (0x7)
 * or + 511 (0x1f7) around the address space. */
#define WRAP_WATCH 0x200
static uint8_t wrap_before[WRAP_WATCH];

static void wrap_snapshot(uint8_t *out)
{
	for (unsigned k = 0; k < WRAP_WATCH; k++)
		out[k] = *(volatile uint8_t *)(uint64_t)k;
}

/* F3: header, 512-byte data buffer, then a last writable buffer of `len` bytes at
 * 0xFFFF_FFFF_FFFF_FFF8, which ends past the top of the address space. */
static unsigned wrapping_chain(uint32_t len)
{
	unsigned i = hostile_chain(T_IN, 0, 0, sizeof(struct blk_hdr), 0, 0);
	uint16_t c = (uint16_t)(3 * i + 2);
	virtq_set_desc(&q, c, 0xfffffffffffffff8ull, len, VIRTQ_DESC_F_WRITE, 0);
	wrap_snapshot(wrap_before);
	return i;
}

/* After a wrapping chain: nothing in low memory changed. */
static void wrap_check(const char *name)
{
	static uint8_t after[WRAP_WATCH];
	wrap_snapshot(after);
	for (unsigned k = 0; k < WRAP_WATCH; k++)
		if (after[k] != wrap_before[k])
			die(EXIT_HOSTILE, "hostile %s: the device wrote guest address 0x%x", name, k);
}

/* Reads virtio-blk.cases; every name must be known. */
static void parse_cases(void)
{
	if (!cmdline_get("virtio-blk.cases", cases, sizeof(cases)))
		memcpy(cases, "all", 4);
	for (const char *p = cases; *p;) {
		const char *start = p;
		while (*p && *p != ',')
			p++;
		int known = str_eq(cases, "all");
		for (unsigned k = 0; k < sizeof(case_names) / sizeof(case_names[0]); k++) {
			unsigned n = 0;
			while (case_names[k][n] && start + n < p && start[n] == case_names[k][n])
				n++;
			known |= !case_names[k][n] && start + n == p;
		}
		if (!known)
			die(EXIT_BAD_PARAM, "bad virtio-blk.cases=%s", cases);
		if (*p == ',')
			p++;
	}
}

static void hostile(uint64_t seed)
{
	bad_addr = BAD_ADDR_DEFAULT;
	uint64_t ram_end = boot_ram_end();
	if (ram_end > bad_addr)
		bad_addr = (ram_end + (1ull << 30)) & ~((1ull << 30) - 1);
	print("virtio-blk: hostile: cases=%s bad-address=0x%lx wait=%ums\n", cases, bad_addr,
	      HOSTILE_WAIT_MS);
	hostile_check("start", seed);

	uint64_t hdr = sizeof(struct blk_hdr);
	for (unsigned k = 0; k < sizeof(case_names) / sizeof(case_names[0]); k++) {
		const char *name = case_names[k];
		if (!case_selected(name))
			continue;
		unsigned i;
		enum hostile_expect want = EXPECT_NOT_OK;
		switch (k) {
		case 0: /* the device cannot read the header */
			i = hostile_chain(T_IN, 0, bad_addr, hdr, 0, 0);
			want = EXPECT_ANY;
			break;
		case 1: /* a read into memory that does not exist */
			i = hostile_chain(T_IN, 0, 0, hdr, bad_addr, 0);
			want = EXPECT_ANY;
			break;
		case 2: /* header cut to 8 bytes: no sector field */
			i = hostile_chain(T_IN, 0, 0, 8, 0, 0);
			break;
		case 3:
			i = hostile_chain(T_IN, capacity, 0, hdr, 0, 0);
			want = EXPECT_IOERR;
			break;
		case 4:
			i = hostile_chain(T_UNKNOWN, 0, 0, hdr, 0, 0);
			want = EXPECT_UNSUPP;
			break;
		case 5: /* status descriptor chains back to the data one: endless */
			i = hostile_chain(T_IN, 0, 0, hdr, 0, 1);
			break;
		case 6: /* F3: its status would wrap to guest address 0x7 */
			i = wrapping_chain(16);
			want = EXPECT_ANY;
			break;
		default: /* F6: a read whose data buffer the device may only read */
			i = hostile_chain(T_IN, 0, 0, hdr, 0, 0);
			{
				uint16_t b = (uint16_t)(3 * i + 1);
				virtq_set_desc(&q, b, (uint64_t)data[i], SECTOR, VIRTQ_DESC_F_NEXT,
					       b + 1);
			}
			want = EXPECT_IOERR;
			break;
		}
		hostile_run(name, i, want, seed + 1 + k);
		if (k == 6)
			wrap_check(name);
	}
	print("virtio-blk: hostile ok\n");
}

/* ---- Set-up and main ---- */

static uint64_t param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

static void setup(int want_event_idx, int want_indirect)
{
	int r = virtio_pci_find(BLK_PCI_DEVICE, 0, &dev);
	if (r == VIRTIO_ERR_NO_DEVICE)
		die(EXIT_NO_DEVICE, "no virtio-blk PCI function on bus 0");
	if (r)
		die(EXIT_BAD_CAPS, "%02x:%02x.%x: missing or unusable virtio/MSI-X capabilities",
		    dev.bdf >> 8, (dev.bdf >> 3) & 0x1f, dev.bdf & 7);
	print("virtio-blk: found %02x:%02x.%x common=0x%lx notify=0x%lx+%u*n device=0x%lx "
	      "msix=%u@0x%lx\n", dev.bdf >> 8, (dev.bdf >> 3) & 0x1f, dev.bdf & 7, dev.common,
	      dev.notify, dev.notify_mult, dev.device, dev.msix_vectors, dev.msix_table);
	if (dev.msix_vectors < 2)
		die(EXIT_BAD_CAPS, "only %u MSI-X vectors", dev.msix_vectors);

	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) |
			  VIRTIO_BIT(VIRTIO_BLK_F_RO);
	if (want_event_idx)
		wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
	if (want_indirect)
		wanted |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
	if (virtio_pci_negotiate(&dev, wanted))
		die(EXIT_FEATURES, "feature negotiation failed (offered 0x%lx)", dev.offered);
	use_indirect = !!(dev.features & VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC));

	virtio_msix_route(&dev, MSIX_CONFIG, CONFIG_VECTOR);
	virtio_msix_route(&dev, MSIX_QUEUE, QUEUE_VECTOR);
	virtio_msix_enable(&dev);
	if (virtio_config_vector(&dev, MSIX_CONFIG) != MSIX_CONFIG)
		die(EXIT_QUEUE_SETUP, "config_msix_vector did not read back");
	if (virtq_init(&dev, &q, 0, QUEUE_MAX, queue_mem, MSIX_QUEUE))
		die(EXIT_QUEUE_SETUP, "cannot set up queue 0 (size, enable or MSI-X vector)");
	uint8_t status = virtio_driver_ok(&dev);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		die(EXIT_QUEUE_SETUP, "device did not start: status=0x%x", status);

	capacity = virtio_config_read64(&dev, 0);
	nslots = use_indirect ? q.size : q.size / 3u;
	if (nslots > MAX_DEPTH)
		nslots = MAX_DEPTH;
	memset(slots, 0, sizeof(slots));
	nfree = 0;
	for (unsigned i = nslots; i > 0; i--)
		put_slot(i - 1);
	uint16_t transport_queues = virtio_num_queues(&dev);
	print("virtio-blk: offered=0x%lx queue-size=%u queues=%u\n", dev.offered, q.size,
	      transport_queues);
	/* A driver that negotiates MQ sets up config num_queues queues: the transport must have
	 * that many. */
	if (dev.offered & VIRTIO_BIT(VIRTIO_BLK_F_MQ)) {
		uint16_t config_queues = (uint16_t)virtio_config_read32(&dev, BLK_CFG_NUM_QUEUES);
		if (config_queues == 0 || config_queues > transport_queues)
			die(EXIT_PROTOCOL, "device config num_queues=%u, but the transport has %u queues",
			    config_queues, transport_queues);
	}
	print("virtio-blk: capacity=%lu features=0x%lx\n", capacity, dev.features);
}

void guest_main(void)
{
	char mode[16] = "normal";
	cmdline_get("virtio-blk.mode", mode, sizeof(mode));
	int normal = str_eq(mode, "normal"), hostile_mode = str_eq(mode, "hostile"),
	    loop = str_eq(mode, "loop"), verify = str_eq(mode, "verify"),
	    bench_mode = str_eq(mode, "bench");
	if (!normal && !hostile_mode && !loop && !verify && !bench_mode)
		die(EXIT_BAD_PARAM, "bad virtio-blk.mode=%s (normal, verify, hostile, loop or bench)",
		    mode);
	uint64_t sectors = param("virtio-blk.sectors", 2048, 1, ~0ull >> 1);
	uint64_t want_depth = param("virtio-blk.depth", 16, 1, MAX_DEPTH);
	uint64_t seed = param("virtio-blk.seed", 1, 0, ~0ull);
	req_sectors = (unsigned)param("virtio-blk.req", 8, 1, MAX_REQ_SECTORS);
	int want_event_idx = (int)param("virtio-blk.event_idx", 1, 0, 1);
	/* Hostile chains are built from plain descriptors. */
	int want_indirect = hostile_mode ? 0 : (int)param("virtio-blk.indirect", 0, 0, 1);
	uint64_t seconds = param("virtio-blk.seconds", 0, 0, 1000000);
	uint64_t cycles = param("virtio-blk.cycles", 0, 0, ~0ull);
	uint64_t timeout_s = param("virtio-blk.timeout", 30, 1, 3600);
	int reset = (int)param("virtio-blk.reset", 0, 0, 1);
	uint64_t report_ms = param("virtio-blk.report_ms", 1000, 1, 60000);
	uint64_t bench_ms = param("virtio-blk.ms", 3000, 1, 3600000);

	if (hostile_mode)
		parse_cases();

	lapic_enable();
	uint64_t hz = tsc_hz();
	timeout_cycles = hz * timeout_s;
	virtio_timer_start();

	setup(want_event_idx, want_indirect);
	depth = want_depth < nslots ? (unsigned)want_depth : nslots;
	print("virtio-blk: mode=%s depth=%u request-sectors=%u event-idx=%u indirect=%u\n", mode,
	      depth, req_sectors, q.event_idx, use_indirect);
	if ((dev.features & VIRTIO_BIT(VIRTIO_BLK_F_RO)) && !verify && !bench_mode)
		die(EXIT_BAD_PARAM, "the device is read-only");

	if (hostile_mode) {
		if (capacity < 8)
			die(EXIT_BAD_PARAM, "disk too small for hostile mode (%lu sectors)", capacity);
		hostile(seed);
	} else {
		if (sectors > capacity)
			die(EXIT_BAD_PARAM, "virtio-blk.sectors=%lu exceeds the capacity %lu", sectors,
			    capacity);
	}

	if (normal) {
		run_pass(T_OUT, sectors, seed);
		print("virtio-blk: wrote %lu sectors\n", sectors);
		if (dev.features & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH))
			flush();
		else
			print("virtio-blk: flush not offered\n");
		run_pass(T_IN, sectors, seed);
		print("virtio-blk: verified %lu sectors\n", sectors);
		get_id();
		if (reset) {
			/* Reset the running device and start it again: the data must still be there. */
			print("virtio-blk: resetting the device\n");
			setup(want_event_idx, want_indirect);
			run_pass(T_IN, sectors, seed);
			print("virtio-blk: verified %lu sectors after reset\n", sectors);
		}
	}

	if (bench_mode)
		bench(bench_ms, seed);

	if (verify) {
		run_pass(T_IN, sectors, seed);
		print("virtio-blk: verified %lu sectors\n", sectors);
	}

	if (loop) {
		uint64_t start = rdtsc(), last = start, done = 0;
		for (;;) {
			run_pass(T_OUT, sectors, seed + done);
			run_pass(T_IN, sectors, seed + done);
			done++;
			uint64_t now = rdtsc();
			int out_of_time = seconds && now - start >= seconds * hz;
			int finished = (cycles && done >= cycles) || out_of_time;
			if (now - last >= hz / 1000 * report_ms || finished) {
				last = now;
				print("virtio-blk: loop cycles=%lu requests=%lu interrupts=%u ms=%lu "
				      "max-wait-us=%lu\n",
				      done, requests, irq_counts[QUEUE_VECTOR],
				      (now - start) / (hz / 1000), max_wait * 1000 / (hz / 1000));
				max_wait = 0;
			}
			if (finished)
				break;
		}
		print("virtio-blk: loop done cycles=%lu sectors=%lu\n", done, sectors);
	}

	print("virtio-blk: requests=%lu notifications=%u\n", requests, q.kicks);
	print("virtio-blk: interrupts=%u\n", irq_counts[QUEUE_VECTOR]);
	print("virtio-blk: ok\n");
	poweroff();
}
