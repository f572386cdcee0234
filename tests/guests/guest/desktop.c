/*
 * desktop: a guest with a screen, a keyboard and a tablet, for the end-to-end tests of the
 * whole desktop chain (guest -> core -> GPU backend -> isola-display -> VNC client, and
 * VNC client -> isola-display -> isola-input -> core -> guest).
 *
 * The GPU half is the `virtio-gpu` guest's own driver, included unchanged (its entry point
 * renamed), so this guest draws exactly that guest's picture with exactly its commands:
 * set-up, frame 1, the 64x64 cursor. The input half drives every virtio-input function the
 * way the `virtio-input` guest does (event buffers posted, one line per report, in that
 * guest's output format), without its hostile cases. Then it serves events until the stop
 * key; a press of the redraw key draws the next frame (2, 3, ...) through the GPU, so a test
 * can show the GPU still serves the guest after its backend was restarted.
 *
 *   desktop.stop=N      key code that ends the run when pressed (default 1, KEY_ESC)
 *   desktop.redraw=N    key code that draws the next frame when pressed (default 57, space)
 *   desktop.timeout=S   give up after S seconds without any event (default 60)
 *   virtio-gpu.chunks, virtio-gpu.timeout   as for the virtio-gpu guest
 *
 * The output protocol and exit codes are documented in ../src/lib.rs.
 */
#define guest_main virtio_gpu_guest_main
#include "virtio-gpu.c"
#undef guest_main

#define INPUT_PCI_DEVICE    (VIRTIO_PCI_DEVICE_BASE + 18)
#define INPUT_MAX_DEVS      2
#define INPUT_QUEUE_MAX     64
#define INPUT_MAX_REPORT    32
#define EV_SYN              0x00
#define EV_KEY              0x01
#define CFG_ABS_INFO        0x12
/* MSI vectors of input device n: 0x60 + 4n (config), + 1 (events), + 2 (status). The GPU
 * half uses 0x40..0x42. */
#define INPUT_VECTOR_BASE   0x60

#define EXIT_DESKTOP_NO_INPUT   50
#define EXIT_DESKTOP_SETUP      51
#define EXIT_DESKTOP_TIMEOUT    52
#define EXIT_DESKTOP_PROTOCOL   53

struct input_event {
	uint16_t type;
	uint16_t code;
	uint32_t value;
};

struct input_dev {
	struct virtio_pci_dev pci;
	struct virtq q[2];
	unsigned nreport;
	struct input_event report[INPUT_MAX_REPORT];
};

_Static_assert(VIRTQ_BYTES(INPUT_QUEUE_MAX) <= 4096, "a queue fits a page");
static uint8_t input_queue_mem[INPUT_MAX_DEVS][2][4096] __attribute__((aligned(4096)));
static struct input_event input_buf[INPUT_MAX_DEVS][INPUT_QUEUE_MAX] __attribute__((aligned(64)));
static struct input_dev inputs[INPUT_MAX_DEVS];
static unsigned ninputs;

static __attribute__((noreturn)) void desktop_die(uint8_t code, const char *fmt, ...)
{
	va_list ap;
	serial_puts("desktop: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	debug_exit(code);
}

static void input_setup(unsigned n, struct input_dev *d)
{
	if (d->pci.msix_vectors < 3)
		desktop_die(EXIT_DESKTOP_SETUP, "input %u: only %u MSI-X vectors", n,
			    d->pci.msix_vectors);
	if (virtio_pci_negotiate(&d->pci, VIRTIO_BIT(VIRTIO_F_VERSION_1) |
					   VIRTIO_BIT(VIRTIO_F_EVENT_IDX)))
		desktop_die(EXIT_DESKTOP_SETUP, "input %u: feature negotiation failed", n);
	for (unsigned e = 0; e < 3; e++)
		virtio_msix_route(&d->pci, e, (uint8_t)(INPUT_VECTOR_BASE + 4 * n + e));
	virtio_msix_enable(&d->pci);
	if (virtio_config_vector(&d->pci, 0) != 0)
		desktop_die(EXIT_DESKTOP_SETUP, "input %u: config vector refused", n);
	for (uint16_t qi = 0; qi < 2; qi++)
		if (virtq_init(&d->pci, &d->q[qi], qi, INPUT_QUEUE_MAX, input_queue_mem[n][qi],
			       qi + 1))
			desktop_die(EXIT_DESKTOP_SETUP, "input %u: cannot set up queue %u", n, qi);
	uint8_t status = virtio_driver_ok(&d->pci);
	if (!(status & VIRTIO_STATUS_DRIVER_OK) || (status & VIRTIO_STATUS_NEEDS_RESET))
		desktop_die(EXIT_DESKTOP_SETUP, "input %u: device did not start: status=0x%x", n,
			    status);
	/* The absolute axes' range, so the tests can check the scaling the guest would do. */
	volatile uint8_t *cfg = (volatile uint8_t *)d->pci.device;
	for (uint8_t axis = 0; axis < 2; axis++) {
		cfg[0] = CFG_ABS_INFO;
		cfg[1] = axis;
		if (cfg[2] != 20)
			continue;
		uint32_t min = 0, max = 0;
		for (unsigned i = 0; i < 4; i++) {
			min |= (uint32_t)cfg[8 + i] << (8 * i);
			max |= (uint32_t)cfg[12 + i] << (8 * i);
		}
		print("virtio-input: dev=%u abs=%u min=%u max=%u\n", n, axis, min, max);
	}
}

static void input_post(unsigned n, uint16_t i)
{
	struct virtq *q = &inputs[n].q[0];
	virtq_set_desc(q, i, (uint64_t)&input_buf[n][i], sizeof(struct input_event),
		       VIRTQ_DESC_F_WRITE, 0);
	virtq_add(q, i);
}

/* One used event buffer of device n. At the end of a report: returns the code of the key it
 * pressed (the last one), or 0. */
static uint16_t input_take(unsigned n, uint32_t id, uint32_t len)
{
	struct input_dev *d = &inputs[n];
	if (id >= INPUT_QUEUE_MAX || len != sizeof(struct input_event))
		desktop_die(EXIT_DESKTOP_PROTOCOL, "input %u: used id %u len %u", n, id, len);
	struct input_event e = input_buf[n][id];
	input_post(n, (uint16_t)id);
	if (d->nreport == INPUT_MAX_REPORT)
		desktop_die(EXIT_DESKTOP_PROTOCOL, "input %u: report longer than %u events", n,
			    INPUT_MAX_REPORT);
	d->report[d->nreport++] = e;
	if (e.type != EV_SYN)
		return 0;
	uint16_t pressed = 0;
	serial_puts("virtio-input: ");
	print("dev=%u report", n);
	for (unsigned i = 0; i < d->nreport; i++) {
		struct input_event *r = &d->report[i];
		print(" %u:%u:%u", r->type, r->code, r->value);
		if (r->type == EV_KEY && r->value == 1)
			pressed = r->code;
	}
	serial_putc('\n');
	d->nreport = 0;
	return pressed;
}

static uint64_t desktop_param(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
	uint64_t v = dflt;
	int r = cmdline_u64(key, &v);
	if (r < 0 || v < min || v > max)
		desktop_die(EXIT_BAD_PARAM, "bad %s (want %lu..%lu)", key, min, max);
	return v;
}

void guest_main(void)
{
	unsigned chunks = (unsigned)param("virtio-gpu.chunks", 4, 1, MAX_CHUNKS);
	uint64_t gpu_timeout_s = param("virtio-gpu.timeout", 30, 1, 3600);
	uint16_t stop = (uint16_t)desktop_param("desktop.stop", 1, 1, 0x2ff);
	uint16_t redraw = (uint16_t)desktop_param("desktop.redraw", 57, 1, 0x2ff);
	uint64_t timeout_s = desktop_param("desktop.timeout", 60, 1, 3600);

	lapic_enable();
	uint64_t hz = tsc_hz();
	timeout_cycles = hz * gpu_timeout_s;
	virtio_timer_start();

	/* The screen: the virtio-gpu guest's set-up, frame 1 and cursor. */
	setup();
	framebuffer(chunks);
	uint32_t frame = 1;
	show_frame(frame);
	cursor();

	/* The keyboard and the tablet. */
	while (ninputs < INPUT_MAX_DEVS &&
	       virtio_pci_find(INPUT_PCI_DEVICE, ninputs, &inputs[ninputs].pci) == 0)
		ninputs++;
	if (!ninputs)
		desktop_die(EXIT_DESKTOP_NO_INPUT, "no virtio-input PCI function on bus 0");
	for (unsigned n = 0; n < ninputs; n++) {
		input_setup(n, &inputs[n]);
		struct virtq *q = &inputs[n].q[0];
		for (uint16_t i = 0; i < q->size; i++)
			input_post(n, i);
		virtq_kick(q);
	}
	print("desktop: ready inputs=%u\n", ninputs);

	uint64_t last = rdtsc();
	for (;;) {
		uint32_t seen = irq_total;
		int any = 0, stopping = 0;
		for (unsigned n = 0; n < ninputs; n++) {
			struct virtq *q = &inputs[n].q[0];
			uint32_t id, len;
			int got = 0;
			while (virtq_pop(q, &id, &len)) {
				got = any = 1;
				uint16_t key = input_take(n, id, len);
				if (key == stop)
					stopping = 1;
				else if (key == redraw)
					show_frame(++frame);
			}
			if (got)
				virtq_kick(q);
			if (virtq_arm(q))
				any = 1;
		}
		if (stopping) {
			print("desktop: done frames=%u\n", frame);
			poweroff();
		}
		if (any) {
			last = rdtsc();
			continue;
		}
		if (rdtsc() - last > timeout_s * hz)
			desktop_die(EXIT_DESKTOP_TIMEOUT, "no event for %lu s", timeout_s);
		sys_wait_irq(seen);
	}
}
