/*
 * virtio-console: drives the first virtio-console PCI function (0x1af4:0x1043), with the
 * MULTIPORT control handshake when the device offers it, in one of these modes:
 *
 *   echo    echoes everything a port receives back on the same port, buffer for buffer
 *           (receive buffer i becomes transmit buffer i, and is posted again once the device
 *           returns it), until console.bytes bytes went round; then reports their CRC-32;
 *   stream  writes a position pattern on its port for console.seconds seconds (or until
 *           input arrives on the port), as fast as the device takes it, printing a tick line on
 *           COM1 every 50 ms (a counter of loop rounds, which also advances while the device
 *           is gone);
 *   sink    receives on its port as fast as the device gives (8 buffers of 64 KiB, each
 *           posted again at once), until a second passes with nothing after the first byte;
 *           then reports how many bytes arrived;
 *   shell   an interactive line prompt on port 0: "guest> ", each line answered with
 *           "you typed: LINE", "exit" powers off;
 *   hostile malformed control messages and buffers, one at a time, each of which must come
 *           back unused, then one valid line on port 0.
 *
 * The output protocol, parameters and exit codes are documented in ../src/lib.rs.
 */
#include "virtio.h"

#define CONSOLE_PCI_DEVICE  (VIRTIO_PCI_DEVICE_BASE + 3)
#define F_MULTIPORT         1

#define C_DEVICE_READY      0
#define C_DEVICE_ADD        1
#define C_PORT_READY        3
#define C_CONSOLE_PORT      4
#define C_RESIZE            5
#define C_PORT_OPEN         6
#define C_PORT_NAME         7

#define MAX_PORTS           4
#define QSIZE               64
#define NQUEUES             (2 * MAX_PORTS + 2)
#define CTRL_BUFS           16
#define CTRL_BUF            160
#define ECHO_BUFS           16
#define ECHO_BUF            4096
#define STREAM_SLOTS        8
#define STREAM_MAX          65536
#define SHELL_BUF           256

#define MSIX_CONFIG         0
#define MSIX_QUEUE          1
#define CONFIG_VECTOR       0x41
#define QUEUE_VECTOR        0x40

#define EXIT_NO_DEVICE      10
#define EXIT_BAD_CAPS       11
#define EXIT_FEATURES       12
#define EXIT_QUEUE_SETUP    13
#define EXIT_BAD_PARAM      14
#define EXIT_TIMEOUT        17
#define EXIT_PROTOCOL       19

/* One 4 KiB-aligned area per queue (the descriptor table must be 16-byte aligned). */
static uint8_t qmem[NQUEUES][(VIRTQ_BYTES(QSIZE) + 4095) / 4096 * 4096] __attribute__((aligned(4096)));
static struct virtq queues[NQUEUES];
static struct virtio_pci_dev dev;
static unsigned nports = 1, multiport;
static uint64_t hz;

static uint8_t ctrl_in[CTRL_BUFS][CTRL_BUF] __attribute__((aligned(64)));
static uint8_t ctrl_out[QSIZE][8] __attribute__((aligned(64)));
static uint16_t ctrl_out_next;
static unsigned ports_added;
static uint8_t port_added[MAX_PORTS];
static char port_names[MAX_PORTS][CTRL_BUF];

static uint8_t echo_buf[ECHO_BUFS][ECHO_BUF] __attribute__((aligned(4096)));
static uint8_t stream_buf[STREAM_SLOTS][STREAM_MAX] __attribute__((aligned(4096)));
static uint8_t shell_in[4][SHELL_BUF], shell_out[QSIZE][SHELL_BUF];

static __attribute__((noreturn)) void die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("console: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	if (dev.common)
		virtio_fail(&dev);
	debug_exit(code);
}

static uint64_t param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

/* CRC-32 (as rt.c's crc32 and crc32fast) carried across calls: start with 0. */
static uint32_t crc_update(uint32_t crc, const volatile uint8_t *p, uint64_t n)
{
	crc = ~crc;
	for (uint64_t i = 0; i < n; i++) {
		crc ^= p[i];
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1));
	}
	return ~crc;
}

static struct virtq *rxq(unsigned port)
{
	return &queues[port == 0 ? 0 : 2 + 2 * port];
}

static struct virtq *txq(unsigned port)
{
	return &queues[port == 0 ? 1 : 3 + 2 * port];
}

/* Waits until one of `n` queues has a used entry (1) or the TSC passes `deadline` (0). */
static int wait_queues(struct virtq **qs, unsigned n, uint64_t deadline)
{
	for (;;) {
		uint32_t seen = irq_total;
		for (unsigned i = 0; i < n; i++)
			if (virtq_arm(qs[i]))
				return 1;
		if ((int64_t)(rdtsc() - deadline) >= 0)
			return 0;
		sys_wait_irq(seen);
	}
}

/* ---- Control queues (MULTIPORT) ---- */

static void ctrl_post(uint16_t i)
{
	struct virtq *q = &queues[2];
	virtq_set_desc(q, i, (uint64_t)ctrl_in[i], CTRL_BUF, VIRTQ_DESC_F_WRITE, 0);
	virtq_add(q, i);
}

static void ctrl_send(uint32_t id, uint16_t event, uint16_t value)
{
	struct virtq *q = &queues[3];
	uint32_t uid, ulen;
	while (virtq_pop(q, &uid, &ulen))
		;
	uint16_t i = ctrl_out_next++ % q->size;
	uint8_t *m = ctrl_out[i];
	memcpy(m, &id, 4);
	memcpy(m + 4, &event, 2);
	memcpy(m + 6, &value, 2);
	virtq_set_desc(q, i, (uint64_t)m, 8, 0, 0);
	virtq_add(q, i);
	virtq_kick(q);
}

/* Handles every control message the device has sent. */
static void ctrl_poll(void)
{
	if (!multiport)
		return;
	struct virtq *q = &queues[2];
	uint32_t id, len;
	int any = 0;
	while (virtq_pop(q, &id, &len)) {
		if (id >= CTRL_BUFS || len < 8 || len > CTRL_BUF)
			die(EXIT_PROTOCOL, "bad control completion id=%u len=%u", id, len);
		const uint8_t *m = ctrl_in[id];
		uint32_t port;
		uint16_t event, value;
		memcpy(&port, m, 4);
		memcpy(&event, m + 4, 2);
		memcpy(&value, m + 6, 2);
		switch (event) {
		case C_DEVICE_ADD:
			if (port >= nports)
				die(EXIT_PROTOCOL, "DEVICE_ADD for port %u of %u", port, nports);
			ports_added++;
			port_added[port] = 1;
			ctrl_send(port, C_PORT_READY, 1);
			break;
		case C_CONSOLE_PORT:
			print("console: port %u is the console\n", port);
			break;
		case C_PORT_NAME:
			if (port < nports) {
				memcpy(port_names[port], m + 8, len - 8);
				port_names[port][len - 8] = 0;
				print("console: port %u name=%s\n", port, port_names[port]);
			}
			break;
		case C_PORT_OPEN:
			print("console: port %u host-open=%u\n", port, value);
			break;
		case C_RESIZE: {
			uint16_t cols, rows;
			memcpy(&cols, m + 8, 2);
			memcpy(&rows, m + 10, 2);
			print("console: resize port=%u cols=%u rows=%u\n", port, cols, rows);
			break;
		}
		default:
			print("console: control event %u for port %u\n", event, port);
		}
		ctrl_post((uint16_t)id);
		any = 1;
	}
	if (any)
		virtq_kick(q);
}

/* DEVICE_READY, then PORT_READY for every port the device adds; waits (bounded) until port 0
 * is added or, if `want_name`, until an added port has that name. Returns its id. */
static unsigned handshake(const char *want_name)
{
	for (uint16_t i = 0; i < CTRL_BUFS; i++)
		ctrl_post(i);
	virtq_kick(&queues[2]);
	ctrl_send(0, C_DEVICE_READY, 1);
	uint64_t deadline = rdtsc() + 10 * hz;
	struct virtq *cq = &queues[2];
	for (;;) {
		ctrl_poll();
		/* A device need not add every port max_nr_ports allows (QEMU adds only those that
		 * exist): wait for the one wanted, port 0 by default. */
		if (!want_name[0] && port_added[0])
			return 0;
		for (unsigned p = 0; want_name[0] && p < nports; p++)
			if (port_added[p] && str_eq(port_names[p], want_name))
				return p;
		if (!wait_queues(&cq, 1, deadline))
			die(EXIT_TIMEOUT, "handshake: %u of %u ports added, no port named '%s'",
			    ports_added, nports, want_name);
	}
}

static void setup(void)
{
	int r = virtio_pci_find(CONSOLE_PCI_DEVICE, 0, &dev);
	if (r == VIRTIO_ERR_NO_DEVICE)
		die(EXIT_NO_DEVICE, "no virtio-console PCI function on bus 0");
	if (r)
		die(EXIT_BAD_CAPS, "missing or unusable virtio/MSI-X capabilities");
	if (virtio_pci_negotiate(&dev, VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(F_MULTIPORT)))
		die(EXIT_FEATURES, "feature negotiation failed (offered 0x%lx)", dev.offered);
	multiport = !!(dev.features & VIRTIO_BIT(F_MULTIPORT));
	uint16_t transport = virtio_num_queues(&dev);
	if (multiport) {
		nports = virtio_config_read32(&dev, 4);
		if (nports == 0 || nports > MAX_PORTS || 2 * nports + 2 > transport)
			die(EXIT_PROTOCOL, "max_nr_ports=%u with %u queues", nports, transport);
	}
	virtio_msix_route(&dev, MSIX_CONFIG, CONFIG_VECTOR);
	virtio_msix_route(&dev, MSIX_QUEUE, QUEUE_VECTOR);
	virtio_msix_enable(&dev);
	virtio_config_vector(&dev, MSIX_CONFIG);
	unsigned nq = multiport ? 2 * nports + 2 : 2;
	for (unsigned i = 0; i < nq; i++)
		if (virtq_init(&dev, &queues[i], (uint16_t)i, QSIZE, qmem[i], MSIX_QUEUE))
			die(EXIT_QUEUE_SETUP, "cannot set up queue %u", i);
	uint8_t status = virtio_driver_ok(&dev);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		die(EXIT_QUEUE_SETUP, "device did not start: status=0x%x", status);
	print("console: features=0x%lx multiport=%u ports=%u queues=%u\n", dev.features, multiport,
	      nports, transport);
}

/* ---- echo ---- */

static void echo(unsigned port, uint64_t total)
{
	struct virtq *rx = rxq(port), *tx = txq(port);
	for (uint16_t i = 0; i < ECHO_BUFS; i++) {
		virtq_set_desc(rx, i, (uint64_t)echo_buf[i], ECHO_BUF, VIRTQ_DESC_F_WRITE, 0);
		virtq_add(rx, i);
	}
	virtq_kick(rx);
	uint64_t received = 0, echoed = 0;
	uint32_t crc = 0;
	uint64_t timeout = 60 * hz, deadline = rdtsc() + timeout;
	struct virtq *both[3] = { rx, tx, &queues[2] };
	while (echoed < total) {
		uint32_t id, len;
		while (virtq_pop(rx, &id, &len)) {
			if (id >= ECHO_BUFS || len > ECHO_BUF)
				die(EXIT_PROTOCOL, "bad receive completion id=%u len=%u", id, len);
			crc = crc_update(crc, echo_buf[id], len);
			received += len;
			virtq_set_desc(tx, (uint16_t)id, (uint64_t)echo_buf[id], len, 0, 0);
			virtq_add(tx, (uint16_t)id);
		}
		virtq_kick(tx);
		int reposted = 0;
		while (virtq_pop(tx, &id, &len)) {
			if (id >= ECHO_BUFS)
				die(EXIT_PROTOCOL, "bad transmit completion id=%u", id);
			echoed += tx->desc[id].len;
			virtq_set_desc(rx, (uint16_t)id, (uint64_t)echo_buf[id], ECHO_BUF,
				       VIRTQ_DESC_F_WRITE, 0);
			virtq_add(rx, (uint16_t)id);
			reposted = 1;
			deadline = rdtsc() + timeout;
		}
		if (reposted)
			virtq_kick(rx);
		ctrl_poll();
		if (echoed >= total)
			break;
		if (!wait_queues(both, multiport ? 3 : 2, deadline))
			die(EXIT_TIMEOUT, "echo: stalled at received=%lu echoed=%lu", received,
			    echoed);
	}
	print("console: echoed bytes=%lu crc=%08x\n", echoed, crc);
}

/* ---- stream ---- */

/* Byte `pos` of the stream: byte pos % 4 of the little-endian 32-bit word pos / 4. */
static void fill_stream(uint8_t *out, uint64_t pos, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++) {
		uint64_t p = pos + i;
		out[i] = (uint8_t)((uint32_t)(p >> 2) >> (8 * (p & 3)));
	}
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t next_len(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng % STREAM_MAX) + 1;
}

static void stream(unsigned port, uint64_t seconds, int fill)
{
	struct virtq *tx = txq(port);
	uint16_t free_slots[STREAM_SLOTS];
	unsigned nfree = 0;
	for (unsigned i = 0; i < STREAM_SLOTS; i++)
		free_slots[nfree++] = (uint16_t)i;
	uint64_t pos = 0, acked = 0, rounds = 0;
	uint64_t tick = hz / 20, start = rdtsc(), end = start + seconds * hz;
	uint64_t next_tick = start + tick;
	/* The ticks are the guest-side counter: a faster timer keeps them coming while the
	 * device is gone and nothing else interrupts. */
	lapic_timer_periodic(VIRTIO_TIMER_VECTOR, 625000);
	/* Anything arriving on the port ends the stream early. */
	struct virtq *rx = rxq(port);
	virtq_set_desc(rx, 0, (uint64_t)shell_in[0], SHELL_BUF, VIRTQ_DESC_F_WRITE, 0);
	virtq_add(rx, 0);
	virtq_kick(rx);
	struct virtq *waitq[3] = { tx, rx, &queues[2] };
	unsigned inflight = 0;
	while ((int64_t)(rdtsc() - end) < 0 || inflight) {
		rounds++;
		while ((int64_t)(rdtsc() - end) < 0 && nfree) {
			uint16_t s = free_slots[--nfree];
			uint32_t len = next_len();
			if (fill)
				fill_stream(stream_buf[s], pos, len);
			uint16_t d = (uint16_t)(2 * s);
			if (len > 1024) {
				/* Two descriptors: the device must join them. */
				uint32_t a = len / 3;
				virtq_set_desc(tx, d, (uint64_t)stream_buf[s], a, VIRTQ_DESC_F_NEXT,
					       d + 1);
				virtq_set_desc(tx, d + 1, (uint64_t)stream_buf[s] + a, len - a, 0, 0);
			} else {
				virtq_set_desc(tx, d, (uint64_t)stream_buf[s], len, 0, 0);
			}
			virtq_add(tx, d);
			pos += len;
			inflight++;
		}
		virtq_kick(tx);
		wait_queues(waitq, multiport ? 3 : 2, next_tick);
		uint32_t id, len;
		if (virtq_pop(rx, &id, &len) && (int64_t)(rdtsc() - end) < 0) {
			print("console: stream stopped by input\n");
			end = rdtsc();
		}
		while (virtq_pop(tx, &id, &len)) {
			if (id >= 2 * STREAM_SLOTS || (id & 1))
				die(EXIT_PROTOCOL, "bad transmit completion id=%u", id);
			free_slots[nfree++] = (uint16_t)(id / 2);
			inflight--;
			acked++;
		}
		ctrl_poll();
		uint64_t now = rdtsc();
		if ((int64_t)(now - next_tick) >= 0) {
			print("console: tick rounds=%lu sent=%lu buffers-done=%lu\n", rounds, pos,
			      acked);
			next_tick = now + tick;
		}
	}
	virtio_timer_start();
	print("console: stream done bytes=%lu buffers=%lu\n", pos, acked);
}

/* ---- sink ---- */

static void sink(unsigned port, uint64_t seconds)
{
	struct virtq *rx = rxq(port);
	for (uint16_t i = 0; i < STREAM_SLOTS; i++) {
		virtq_set_desc(rx, i, (uint64_t)stream_buf[i], STREAM_MAX, VIRTQ_DESC_F_WRITE, 0);
		virtq_add(rx, i);
	}
	virtq_kick(rx);
	print("console: sink ready\n");
	uint64_t got = 0, buffers = 0;
	uint64_t end = rdtsc() + seconds * hz, last = 0;
	struct virtq *waitq[2] = { rx, &queues[2] };
	for (;;) {
		uint32_t id, len;
		int reposted = 0;
		while (virtq_pop(rx, &id, &len)) {
			if (id >= STREAM_SLOTS || len > STREAM_MAX)
				die(EXIT_PROTOCOL, "bad receive completion id=%u len=%u", id, len);
			got += len;
			buffers++;
			virtq_add(rx, (uint16_t)id);
			reposted = 1;
		}
		if (reposted) {
			virtq_kick(rx);
			last = rdtsc();
		}
		ctrl_poll();
		uint64_t now = rdtsc();
		/* Done a second after the last input, or at the deadline. */
		uint64_t until = got ? last + hz : end;
		if ((int64_t)(now - until) >= 0 || (int64_t)(now - end) >= 0)
			break;
		wait_queues(waitq, multiport ? 2 : 1, (int64_t)(until - end) < 0 ? until : end);
	}
	print("console: sink done bytes=%lu buffers=%lu\n", got, buffers);
}

/* ---- hostile ---- */

static void shell_write(const char *s);

#define EXIT_HOSTILE        18
#define BAD_ADDR_DEFAULT    0x300000000ull
#define HOSTILE_DESC        60

static uint8_t hostile_buf[64] __attribute__((aligned(64)));

/* Puts a one- or two-descriptor chain at HOSTILE_DESC of `q`, waits (2 s) for the device to
 * return it and checks it came back with `want_len` bytes written. */
static void hostile_case(struct virtq *q, const char *name, uint64_t addr, uint32_t len,
			 uint16_t flags, uint64_t addr2, uint32_t len2, uint32_t want_len)
{
	uint16_t d = HOSTILE_DESC;
	if (len2) {
		virtq_set_desc(q, d, addr, len, flags | VIRTQ_DESC_F_NEXT, d + 1);
		virtq_set_desc(q, d + 1, addr2, len2, flags, 0);
	} else {
		virtq_set_desc(q, d, addr, len, flags, 0);
	}
	virtq_add(q, d);
	virtq_kick(q);
	uint64_t deadline = rdtsc() + 2 * hz;
	for (;;) {
		uint32_t id, ulen;
		if (virtq_pop(q, &id, &ulen)) {
			if (id < HOSTILE_DESC)
				continue;       /* earlier ordinary traffic (the handshake) */
			if (id != d)
				die(EXIT_HOSTILE, "hostile %s: device returned descriptor %u", name, id);
			if (ulen != want_len)
				die(EXIT_HOSTILE, "hostile %s: returned len=%u, want %u", name, ulen,
				    want_len);
			print("console: hostile %s: returned len=%u\n", name, ulen);
			return;
		}
		if (!wait_queues(&q, 1, deadline))
			die(EXIT_HOSTILE, "hostile %s: never returned (status=0x%x)", name,
			    virtio_status(&dev));
	}
}

static void hostile(void)
{
	if (!multiport)
		die(EXIT_BAD_PARAM, "hostile mode needs MULTIPORT");
	uint64_t bad = BAD_ADDR_DEFAULT, ram_end = boot_ram_end();
	if (ram_end > bad)
		bad = (ram_end + (1ull << 30)) & ~((1ull << 30) - 1);
	print("console: hostile: bad-address=0x%lx\n", bad);
	struct virtq *cq = &queues[3], *cin = &queues[2];
	uint64_t hb = (uint64_t)hostile_buf;
	/* Let the handshake's last messages arrive first. */
	uint64_t quiet = rdtsc() + hz / 5;
	while ((int64_t)(rdtsc() - quiet) < 0)
		ctrl_poll();
	uint16_t cin_used = cin->used[1];
	struct { const char *name; uint32_t id; uint16_t event, value; uint32_t len; } msgs[] = {
		{ "unknown-event", 0, 99, 1, 8 },
		{ "device-only-event", 0, C_DEVICE_ADD, 0, 8 },
		{ "bad-port-ready", 9, C_PORT_READY, 1, 8 },
		{ "bad-port-open", 0xffffffffu, C_PORT_OPEN, 1, 8 },
		{ "short-message", 0, C_DEVICE_READY, 1, 4 },
	};
	for (unsigned i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++) {
		memcpy(hostile_buf, &msgs[i].id, 4);
		memcpy(hostile_buf + 4, &msgs[i].event, 2);
		memcpy(hostile_buf + 6, &msgs[i].value, 2);
		hostile_case(cq, msgs[i].name, hb, msgs[i].len, 0, 0, 0, 0);
	}
	hostile_case(cq, "control-outside-ram", bad, 8, 0, 0, 0, 0);
	hostile_case(cq, "control-oversized", hb, 0xfffff000u, 0, 0, 0, 0);
	hostile_case(cq, "control-device-writable", hb, 8, VIRTQ_DESC_F_WRITE, 0, 0, 0);
	/* None of them may make the device say anything. */
	uint64_t settle = rdtsc() + hz / 5;
	while ((int64_t)(rdtsc() - settle) < 0)
		cpu_relax();
	if (cin->used[1] != cin_used)
		die(EXIT_HOSTILE, "hostile: the device answered a bad control message");

	struct virtq *tx = txq(0), *rx = rxq(0);
	memcpy(hostile_buf, "LEAKED!!", 8);
	hostile_case(tx, "tx-outside-ram", bad, 16, 0, 0, 0, 0);
	hostile_case(tx, "tx-oversized", hb, 0xfffff000u, 0, 0, 0, 0);
	hostile_case(tx, "tx-device-writable", hb, 8, VIRTQ_DESC_F_WRITE, 0, 0, 0);
	hostile_case(tx, "tx-half-outside", hb, 8, 0, bad, 8, 0);
	hostile_case(rx, "rx-device-readable", hb, 64, 0, 0, 0, 0);
	hostile_case(rx, "rx-outside-ram", bad, 64, VIRTQ_DESC_F_WRITE, 0, 0, 0);

	/* The device still works: a normal line on port 0. */
	shell_write("after hostile\n");
	uint64_t deadline = rdtsc() + 5 * hz;
	uint32_t id, len;
	while (!virtq_pop(tx, &id, &len))
		if (!wait_queues(&tx, 1, deadline))
			die(EXIT_HOSTILE, "hostile: valid output afterwards never returned");
	print("console: hostile ok\n");
}

/* ---- shell ---- */

static uint16_t shell_tx_next;

static void shell_write(const char *s)
{
	struct virtq *tx = txq(0);
	uint32_t id, len;
	while (virtq_pop(tx, &id, &len))
		;
	uint16_t i = shell_tx_next++ % tx->size;
	size_t n = 0;
	while (s[n] && n < SHELL_BUF)
		n++;
	memcpy(shell_out[i], s, n);
	virtq_set_desc(tx, i, (uint64_t)shell_out[i], (uint32_t)n, 0, 0);
	virtq_add(tx, i);
	virtq_kick(tx);
}

static void shell(void)
{
	struct virtq *rx = rxq(0), *tx = txq(0);
	for (uint16_t i = 0; i < 4; i++) {
		virtq_set_desc(rx, i, (uint64_t)shell_in[i], SHELL_BUF, VIRTQ_DESC_F_WRITE, 0);
		virtq_add(rx, i);
	}
	virtq_kick(rx);
	char line[SHELL_BUF], reply[SHELL_BUF + 32];
	unsigned n = 0;
	shell_write("guest> ");
	print("console: shell ready\n");
	struct virtq *waitq[3] = { rx, tx, &queues[2] };
	for (;;) {
		uint32_t id, len;
		while (virtq_pop(rx, &id, &len)) {
			if (id >= 4 || len > SHELL_BUF)
				die(EXIT_PROTOCOL, "bad receive completion id=%u len=%u", id, len);
			for (uint32_t k = 0; k < len; k++) {
				char c = (char)shell_in[id][k];
				if (c != '\r' && c != '\n') {
					if (n < SHELL_BUF - 1)
						line[n++] = c;
					continue;
				}
				line[n] = 0;
				if (n == 0)
					continue;
				print("console: shell line '%s'\n", line);
				if (str_eq(line, "exit")) {
					shell_write("bye\r\n");
					uint64_t until = rdtsc() + hz;
					while (tx->last_used != tx->avail_idx &&
					       wait_queues(&tx, 1, until))
						while (virtq_pop(tx, &id, &len))
							;
					return;
				}
				memcpy(reply, "you typed: ", 11);
				memcpy(reply + 11, line, n);
				memcpy(reply + 11 + n, "\r\nguest> ", 10);
				shell_write(reply);
				n = 0;
			}
			virtq_set_desc(rx, (uint16_t)id, (uint64_t)shell_in[id], SHELL_BUF,
				       VIRTQ_DESC_F_WRITE, 0);
			virtq_add(rx, (uint16_t)id);
			virtq_kick(rx);
		}
		while (virtq_pop(tx, &id, &len))
			;
		ctrl_poll();
		wait_queues(waitq, multiport ? 3 : 2, rdtsc() + hz);
	}
}

void guest_main(void)
{
	char mode[16] = "echo", name[CTRL_BUF] = "";
	cmdline_get("console.mode", mode, sizeof(mode));
	cmdline_get("console.name", name, sizeof(name));
	int is_echo = str_eq(mode, "echo"), is_stream = str_eq(mode, "stream"),
	    is_shell = str_eq(mode, "shell"), is_hostile = str_eq(mode, "hostile"),
	    is_sink = str_eq(mode, "sink");
	if (!is_echo && !is_stream && !is_shell && !is_hostile && !is_sink)
		die(EXIT_BAD_PARAM, "bad console.mode=%s (echo, stream, sink, shell or hostile)",
		    mode);
	uint64_t bytes = param("console.bytes", 1 << 20, 1, ~0ull >> 1);
	uint64_t seconds = param("console.seconds", 5, 1, 3600);
	int fill = (int)param("console.fill", 1, 0, 1);

	lapic_enable();
	hz = tsc_hz();
	virtio_timer_start();
	setup();
	unsigned port = 0;
	if (multiport) {
		port = handshake(name);
		ctrl_send(port, C_PORT_OPEN, 1);
	} else if (name[0]) {
		die(EXIT_PROTOCOL, "console.name=%s needs MULTIPORT", name);
	}
	print("console: mode=%s port=%u\n", mode, port);
	if (is_echo)
		echo(port, bytes);
	else if (is_stream)
		stream(port, seconds, fill);
	else if (is_sink)
		sink(port, seconds);
	else if (is_hostile)
		hostile();
	else
		shell();
	print("console: ok\n");
	poweroff();
}
