/*
 * virtio-input: drives every virtio-input PCI function (0x1af4:0x1052) on bus 0, up to
 * MAX_DEVS: reads each one's configuration through the select/subsel window and prints it,
 * keeps event buffers posted on each event queue, sends a caps-lock LED report on the status
 * queue of every device that has LEDs, and prints every report (events up to and including
 * EV_SYN) it receives, until a press of the stop key (KEY_ESC by default) on any device.
 *
 *   virtio-input.mode=normal|hostile   hostile: before "ready", bad config writes, malformed
 *                                      status buffers and malformed event buffers (see below)
 *   virtio-input.stop=N                key code that ends the run when pressed (default 1)
 *   virtio-input.timeout=S             give up after S seconds without any event (default 60)
 *
 * The output protocol and exit codes are documented in ../src/lib.rs.
 */
#include "virtio.h"

#define INPUT_PCI_DEVICE    (VIRTIO_PCI_DEVICE_BASE + 18)
#define MAX_DEVS            4
#define QUEUE_MAX           64
#define EVENTQ              0
#define STATUSQ             1

#define CFG_ID_NAME         0x01
#define CFG_ID_DEVIDS       0x03
#define CFG_EV_BITS         0x11
#define CFG_ABS_INFO        0x12
#define EV_SYN              0x00
#define EV_KEY              0x01
#define EV_REL              0x02
#define EV_ABS              0x03
#define EV_LED              0x11
#define EV_REP              0x14
#define LED_CAPSL           1

#define EXIT_NO_DEVICE      40
#define EXIT_SETUP          41
#define EXIT_BAD_PARAM      42
#define EXIT_TIMEOUT        43
#define EXIT_PROTOCOL       44
#define EXIT_HOSTILE        45

/* A report longer than this is a device error. */
#define MAX_REPORT          32
#define HOSTILE_EVENT_BUFS  4
#define BAD_ADDR_DEFAULT    0x300000000ull

struct input_event {
	uint16_t type;
	uint16_t code;
	uint32_t value;
};

struct input_dev {
	struct virtio_pci_dev pci;
	struct virtq q[2];
	unsigned hostile_left;          /* hostile event buffers not yet returned */
	unsigned nreport;
	struct input_event report[MAX_REPORT];
};

/* One page per queue: every ring starts 4 KiB aligned. */
_Static_assert(VIRTQ_BYTES(QUEUE_MAX) <= 4096, "a queue fits a page");
static uint8_t queue_mem[MAX_DEVS][2][4096] __attribute__((aligned(4096)));
static struct input_event event_buf[MAX_DEVS][QUEUE_MAX] __attribute__((aligned(64)));
static struct input_event status_buf[MAX_DEVS][8] __attribute__((aligned(64)));
static struct input_dev devs[MAX_DEVS];
static unsigned ndevs;
static uint64_t bad_addr;

static __attribute__((noreturn)) void die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("virtio-input: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	debug_exit(code);
}

/* ---- Configuration: the select/subsel window ---- */

static volatile uint8_t *cfg(struct input_dev *d, unsigned off)
{
	return (volatile uint8_t *)(d->pci.device + off);
}

/* Selects (select, subsel) and copies out the union; returns size. */
static unsigned cfg_select(struct input_dev *d, uint8_t select, uint8_t subsel, uint8_t *out)
{
	*cfg(d, 0) = select;
	*cfg(d, 1) = subsel;
	unsigned size = *cfg(d, 2);
	if (size > 128)
		die(EXIT_PROTOCOL, "config size %u for select 0x%x", size, select);
	for (unsigned i = 0; i < size; i++)
		out[i] = *cfg(d, 8 + i);
	return size;
}

static void print_config(unsigned n, struct input_dev *d)
{
	uint8_t u[129];
	unsigned size = cfg_select(d, CFG_ID_NAME, 0, u);
	u[size] = 0;
	print("virtio-input: dev=%u name=\"%s\"\n", n, (const char *)u);
	size = cfg_select(d, CFG_ID_DEVIDS, 0, u);
	if (size != 8)
		die(EXIT_PROTOCOL, "dev=%u: ID_DEVIDS size %u", n, size);
	print("virtio-input: dev=%u ids=%04x:%04x:%04x:%04x\n", n, u[0] | u[1] << 8,
	      u[2] | u[3] << 8, u[4] | u[5] << 8, u[6] | u[7] << 8);
	static const uint8_t types[] = { EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_LED, EV_REP };
	for (unsigned t = 0; t < sizeof(types); t++) {
		size = cfg_select(d, CFG_EV_BITS, types[t], u);
		print("virtio-input: dev=%u ev=0x%02x size=%u bits=", n, types[t], size);
		for (unsigned i = 0; i < size; i++)
			print("%02x", u[i]);
		serial_putc('\n');
	}
	for (unsigned axis = 0; axis < 2; axis++) {
		size = cfg_select(d, CFG_ABS_INFO, (uint8_t)axis, u);
		if (!size)
			continue;
		if (size != 20)
			die(EXIT_PROTOCOL, "dev=%u: ABS_INFO size %u", n, size);
		uint32_t *w = (uint32_t *)u;
		print("virtio-input: dev=%u abs=%u min=%u max=%u fuzz=%u flat=%u res=%u\n", n, axis,
		      w[0], w[1], w[2], w[3], w[4]);
	}
}

/* ---- Set-up ---- */

static void setup(unsigned n, struct input_dev *d)
{
	if (d->pci.msix_vectors < 3)
		die(EXIT_SETUP, "dev=%u: only %u MSI-X vectors", n, d->pci.msix_vectors);
	if (virtio_pci_negotiate(&d->pci, VIRTIO_BIT(VIRTIO_F_VERSION_1) |
					   VIRTIO_BIT(VIRTIO_F_EVENT_IDX)))
		die(EXIT_SETUP, "dev=%u: feature negotiation failed (offered 0x%lx)", n,
		    d->pci.offered);
	/* Vectors 0x40 + 4n: config, event queue, status queue. */
	for (unsigned e = 0; e < 3; e++)
		virtio_msix_route(&d->pci, e, (uint8_t)(0x40 + 4 * n + e));
	virtio_msix_enable(&d->pci);
	if (virtio_config_vector(&d->pci, 0) != 0)
		die(EXIT_SETUP, "dev=%u: config vector refused", n);
	for (uint16_t qi = 0; qi < 2; qi++)
		if (virtq_init(&d->pci, &d->q[qi], qi, QUEUE_MAX, queue_mem[n][qi], qi + 1))
			die(EXIT_SETUP, "dev=%u: cannot set up queue %u", n, qi);
	uint8_t status = virtio_driver_ok(&d->pci);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		die(EXIT_SETUP, "dev=%u: device did not start: status=0x%x", n, status);
}

/* Posts event buffer i (descriptor i) of device n. */
static void post_event_buf(unsigned n, uint16_t i)
{
	struct virtq *q = &devs[n].q[EVENTQ];
	virtq_set_desc(q, i, (uint64_t)&event_buf[n][i], sizeof(struct input_event),
		       VIRTQ_DESC_F_WRITE, 0);
	virtq_add(q, i);
}

/* Sends `count` events from status_buf[n] on the status queue as one buffer (descriptor 0)
 * and waits for the device to return it. */
static void send_status(unsigned n, unsigned count, uint64_t timeout)
{
	struct virtq *q = &devs[n].q[STATUSQ];
	virtq_set_desc(q, 0, (uint64_t)status_buf[n], count * sizeof(struct input_event), 0, 0);
	virtq_add(q, 0);
	virtq_kick(q);
	if (!virtq_wait(q, rdtsc() + timeout))
		die(EXIT_TIMEOUT, "dev=%u: status buffer not returned", n);
	uint32_t id, len;
	if (!virtq_pop(q, &id, &len) || id != 0)
		die(EXIT_PROTOCOL, "dev=%u: status queue returned %u", n, id);
}

/* ---- Hostile cases ---- */

/* Config: out-of-range selectors read as empty; writes to size and the union are ignored. */
static void hostile_config(unsigned n, struct input_dev *d)
{
	uint8_t u[128];
	if (cfg_select(d, 0xff, 0xff, u) || cfg_select(d, CFG_EV_BITS, 0xee, u) ||
	    cfg_select(d, CFG_ID_NAME, 7, u))
		die(EXIT_HOSTILE, "dev=%u: unknown selector reads as non-empty", n);
	unsigned size = cfg_select(d, CFG_ID_NAME, 0, u);
	*cfg(d, 2) = 99;
	*cfg(d, 8) = '#';
	*cfg(d, 135) = 0x55;
	*(volatile uint32_t *)cfg(d, 4) = 0xffffffff;
	if (*cfg(d, 2) != size || *cfg(d, 8) != u[0] || *cfg(d, 135) != 0 || *cfg(d, 4) != 0)
		die(EXIT_HOSTILE, "dev=%u: a read-only config field changed", n);
}

/* Status queue: each malformed buffer must come back (and be ignored). */
static void hostile_status(unsigned n, uint64_t timeout)
{
	struct virtq *q = &devs[n].q[STATUSQ];
	static const uint32_t lens[] = { 5, 8, 8, 8, 1u << 20 };
	static const uint16_t flags[] = { 0, VIRTQ_DESC_F_WRITE, 0, 0, 0 };
	status_buf[n][0] = (struct input_event){ 0x7777, 0x7777, 1 };
	for (uint16_t i = 0; i < 5; i++) {
		uint64_t addr = i == 2 ? bad_addr : (uint64_t)status_buf[n];
		virtq_set_desc(q, i, addr, lens[i], flags[i], 0);
		virtq_add(q, i);
	}
	virtq_kick(q);
	unsigned back = 0;
	uint32_t id, len;
	while (back < 5) {
		if (!virtq_wait(q, rdtsc() + timeout))
			die(EXIT_HOSTILE, "dev=%u: %u of 5 malformed status buffers returned", n, back);
		while (virtq_pop(q, &id, &len))
			back++;
	}
	print("virtio-input: dev=%u hostile status returned=%u\n", n, back);
}

/* Event queue: descriptors 0..3 are malformed; they must come back empty, before any event. */
static void hostile_events(unsigned n)
{
	struct virtq *q = &devs[n].q[EVENTQ];
	virtq_set_desc(q, 0, (uint64_t)&event_buf[n][0], 8, 0, 0);              /* read-only */
	virtq_set_desc(q, 1, (uint64_t)&event_buf[n][1], 4, VIRTQ_DESC_F_WRITE, 0); /* short */
	virtq_set_desc(q, 2, bad_addr, 8, VIRTQ_DESC_F_WRITE, 0);              /* outside RAM */
	virtq_set_desc(q, 3, (uint64_t)&event_buf[n][3], 8,                    /* next: 200 */
		       VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 200);
	event_buf[n][0] = (struct input_event){ 0xaaaa, 0xaaaa, 0xaaaaaaaa };
	event_buf[n][1] = (struct input_event){ 0xaaaa, 0xaaaa, 0xaaaaaaaa };
	for (uint16_t i = 0; i < HOSTILE_EVENT_BUFS; i++)
		virtq_add(q, i);
	devs[n].hostile_left = HOSTILE_EVENT_BUFS;
}

/* ---- Events ---- */

static uint64_t reports, events;

/* One used event buffer of device n; returns 1 when the stop key was pressed. */
static int take_event(unsigned n, uint32_t id, uint32_t len, uint16_t stop)
{
	struct input_dev *d = &devs[n];
	if (id >= QUEUE_MAX)
		die(EXIT_PROTOCOL, "dev=%u: used id %u", n, id);
	if (d->hostile_left) {
		if (id != HOSTILE_EVENT_BUFS - d->hostile_left || len != 0)
			die(EXIT_HOSTILE, "dev=%u: malformed buffer came back as id=%u len=%u", n, id,
			    len);
		if (event_buf[n][0].type != 0xaaaa || event_buf[n][1].value != 0xaaaaaaaa)
			die(EXIT_HOSTILE, "dev=%u: device wrote into a malformed buffer", n);
		if (--d->hostile_left == 0)
			print("virtio-input: dev=%u hostile events returned=%u\n", n,
			      HOSTILE_EVENT_BUFS);
		post_event_buf(n, (uint16_t)id);
		return 0;
	}
	if (len != sizeof(struct input_event))
		die(EXIT_PROTOCOL, "dev=%u: event buffer %u came back with len=%u", n, id, len);
	struct input_event e = event_buf[n][id];
	post_event_buf(n, (uint16_t)id);
	events++;
	if (d->nreport == MAX_REPORT)
		die(EXIT_PROTOCOL, "dev=%u: report longer than %u events", n, MAX_REPORT);
	d->report[d->nreport++] = e;
	int stopped = 0;
	if (e.type == EV_SYN) {
		serial_puts("virtio-input: ");
		print("dev=%u report", n);
		for (unsigned i = 0; i < d->nreport; i++) {
			struct input_event *r = &d->report[i];
			print(" %u:%u:%u", r->type, r->code, r->value);
			if (r->type == EV_KEY && r->code == stop && r->value == 1)
				stopped = 1;
		}
		serial_putc('\n');
		d->nreport = 0;
		reports++;
	}
	return stopped;
}

static uint64_t param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

void guest_main(void)
{
	char mode[16] = "normal";
	cmdline_get("virtio-input.mode", mode, sizeof(mode));
	int hostile = str_eq(mode, "hostile");
	if (!hostile && !str_eq(mode, "normal"))
		die(EXIT_BAD_PARAM, "bad virtio-input.mode=%s (normal or hostile)", mode);
	uint16_t stop = (uint16_t)param("virtio-input.stop", 1, 1, 0x2ff);
	uint64_t timeout_s = param("virtio-input.timeout", 60, 1, 3600);
	bad_addr = BAD_ADDR_DEFAULT;
	if (boot_ram_end() > bad_addr)
		bad_addr = (boot_ram_end() + (1ull << 30)) & ~((1ull << 30) - 1);

	lapic_enable();
	uint64_t hz = tsc_hz();
	virtio_timer_start();

	while (ndevs < MAX_DEVS && virtio_pci_find(INPUT_PCI_DEVICE, ndevs, &devs[ndevs].pci) == 0)
		ndevs++;
	if (!ndevs)
		die(EXIT_NO_DEVICE, "no virtio-input PCI function on bus 0");
	for (unsigned n = 0; n < ndevs; n++) {
		struct virtio_pci_dev *p = &devs[n].pci;
		print("virtio-input: dev=%u at %02x:%02x.%x\n", n, p->bdf >> 8, (p->bdf >> 3) & 0x1f,
		      p->bdf & 7);
		setup(n, &devs[n]);
		print_config(n, &devs[n]);
		if (hostile)
			hostile_config(n, &devs[n]);
	}
	uint8_t scratch[128];
	for (unsigned n = 0; n < ndevs; n++) {
		if (hostile) {
			hostile_status(n, hz * 2);
			hostile_events(n);
		}
		/* Devices with LEDs get caps lock on, as a driver does when its user presses it. */
		if (cfg_select(&devs[n], CFG_EV_BITS, EV_LED, scratch)) {
			status_buf[n][0] = (struct input_event){ EV_LED, LED_CAPSL, 1 };
			status_buf[n][1] = (struct input_event){ EV_SYN, 0, 0 };
			send_status(n, 2, hz * 5);
			print("virtio-input: dev=%u leds sent\n", n);
		}
		struct virtq *q = &devs[n].q[EVENTQ];
		for (uint16_t i = hostile ? HOSTILE_EVENT_BUFS : 0; i < q->size; i++)
			post_event_buf(n, i);
		virtq_kick(q);
	}
	print("virtio-input: ready devices=%u\n", ndevs);

	uint64_t last = rdtsc();
	for (;;) {
		uint32_t seen = irq_total;
		int any = 0, stopping = 0;
		/* Every device's used entries are taken in each pass, so after the stop key the
		 * events other devices delivered before it are still printed. */
		for (unsigned n = 0; n < ndevs; n++) {
			struct virtq *q = &devs[n].q[EVENTQ];
			uint32_t id, len;
			int got = 0;
			while (virtq_pop(q, &id, &len)) {
				got = any = 1;
				stopping |= take_event(n, id, len, stop);
			}
			if (got)
				virtq_kick(q);
			if (virtq_arm(q))
				any = 1;
		}
		if (stopping) {
			print("virtio-input: done reports=%lu events=%lu\n", reports, events);
			poweroff();
		}
		if (any) {
			last = rdtsc();
			continue;
		}
		if (rdtsc() - last > timeout_s * hz)
			die(EXIT_TIMEOUT, "no event for %lu s (reports=%lu)", timeout_s, reports);
		sys_wait_irq(seen);
	}
}
