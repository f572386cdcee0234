/* Virtio 1.x PCI transport and split virtqueues for the test guests (see virtio.h). */
#include "virtio.h"

/* struct virtio_pci_common_cfg */
#define COMMON_DFSELECT     0x00
#define COMMON_DF           0x04
#define COMMON_GFSELECT     0x08
#define COMMON_GF           0x0c
#define COMMON_MSIX         0x10
#define COMMON_NUMQ         0x12
#define COMMON_STATUS       0x14
#define COMMON_CFGGEN       0x15
#define COMMON_Q_SELECT     0x16
#define COMMON_Q_SIZE       0x18
#define COMMON_Q_MSIX       0x1a
#define COMMON_Q_ENABLE     0x1c
#define COMMON_Q_NOFF       0x1e
#define COMMON_Q_DESC       0x20
#define COMMON_Q_DRIVER     0x28
#define COMMON_Q_DEVICE     0x30

/* struct virtio_pci_cap */
#define CAP_CFG_TYPE        3
#define CAP_BAR             4
#define CAP_OFFSET          8
#define CAP_LENGTH          12
#define CAP_NOTIFY_MULT     16
#define CFG_COMMON          1
#define CFG_NOTIFY          2
#define CFG_ISR             3
#define CFG_DEVICE          4

/* MSI-X capability and table. */
#define MSIX_CONTROL        2
#define MSIX_TABLE          4
#define MSIX_PBA            8
#define MSIX_ENABLE         0x8000
#define MSIX_FUNCTION_MASK  0x4000
#define MSIX_ENTRY_SIZE     16
#define MSI_ADDRESS         0xfee00000u   /* APIC id 0, physical destination */

#define MAPPED_LIMIT        0x100000000ull
#define MAX_CAPS            48            /* guards against a looping capability list */

static uint64_t region(uint32_t bdf, unsigned cap, uint64_t *len)
{
	unsigned bar = pci_read8(bdf, cap + CAP_BAR);
	if (bar > 5)
		return 0;
	uint64_t base = pci_bar_addr(bdf, bar);
	uint64_t off = pci_read32(bdf, cap + CAP_OFFSET);
	*len = pci_read32(bdf, cap + CAP_LENGTH);
	if (!base || base + off + *len > MAPPED_LIMIT)
		return 0;
	return base + off;
}

static uint64_t bir_address(uint32_t bdf, uint32_t reg)
{
	uint64_t base = pci_bar_addr(bdf, reg & 7);
	if ((reg & 7) > 5 || !base || base >= MAPPED_LIMIT)
		return 0;
	return base + (reg & ~7u);
}

static int walk_caps(struct virtio_pci_dev *d)
{
	uint32_t bdf = d->bdf;
	if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return VIRTIO_ERR_CAPS;
	unsigned cap = pci_read8(bdf, PCI_CAP_PTR) & 0xfc;
	for (int n = 0; cap >= 0x40 && n < MAX_CAPS; n++) {
		uint8_t id = pci_read8(bdf, cap);
		uint64_t len = 0, addr;
		if (id == PCI_CAP_ID_VNDR) {
			/* The first capability of each type wins, as the spec recommends. */
			switch (pci_read8(bdf, cap + CAP_CFG_TYPE)) {
			case CFG_COMMON:
				if (!d->common && (addr = region(bdf, cap, &len)) && len >= 0x38)
					d->common = addr;
				break;
			case CFG_NOTIFY:
				if (!d->notify && (addr = region(bdf, cap, &len))) {
					d->notify = addr;
					d->notify_len = (uint32_t)len;
					d->notify_mult = pci_read32(bdf, cap + CAP_NOTIFY_MULT);
				}
				break;
			case CFG_ISR:
				if (!d->isr && (addr = region(bdf, cap, &len)) && len >= 1)
					d->isr = addr;
				break;
			case CFG_DEVICE:
				if (!d->device && (addr = region(bdf, cap, &len))) {
					d->device = addr;
					d->device_len = (uint32_t)len;
				}
				break;
			}
		} else if (id == PCI_CAP_ID_MSIX && !d->msix_cap) {
			d->msix_cap = cap;
			d->msix_vectors = (pci_read16(bdf, cap + MSIX_CONTROL) & 0x7ff) + 1;
			d->msix_table = bir_address(bdf, pci_read32(bdf, cap + MSIX_TABLE));
			d->msix_pba = bir_address(bdf, pci_read32(bdf, cap + MSIX_PBA));
		}
		cap = pci_read8(bdf, cap + 1) & 0xfc;
	}
	if (!d->common || !d->notify || !d->isr || !d->msix_cap || !d->msix_table)
		return VIRTIO_ERR_CAPS;
	return 0;
}

int virtio_pci_find(uint16_t device_id, unsigned nth, struct virtio_pci_dev *d)
{
	memset(d, 0, sizeof(*d));
	for (unsigned slot = 0; slot < 32; slot++) {
		unsigned functions = 1;
		for (unsigned fn = 0; fn < functions; fn++) {
			uint32_t bdf = PCI_BDF(0, slot, fn);
			uint32_t id = pci_read32(bdf, PCI_VENDOR_ID);
			if ((id & 0xffff) == 0xffff)
				continue;
			if (fn == 0 && (pci_read8(bdf, PCI_HEADER_TYPE) & 0x80))
				functions = 8;
			if (id != ((uint32_t)device_id << 16 | VIRTIO_PCI_VENDOR) || nth-- > 0)
				continue;
			d->bdf = bdf;
			d->device_id = device_id;
			pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) |
				    PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
			return walk_caps(d);
		}
	}
	return VIRTIO_ERR_NO_DEVICE;
}

uint8_t virtio_status(struct virtio_pci_dev *d)
{
	return mmio_read8(d->common + COMMON_STATUS);
}

uint16_t virtio_num_queues(struct virtio_pci_dev *d)
{
	return mmio_read16(d->common + COMMON_NUMQ);
}

static void set_status(struct virtio_pci_dev *d, uint8_t bits)
{
	mmio_write8(d->common + COMMON_STATUS, virtio_status(d) | bits);
}

void virtio_fail(struct virtio_pci_dev *d)
{
	set_status(d, VIRTIO_STATUS_FAILED);
}

int virtio_pci_negotiate(struct virtio_pci_dev *d, uint64_t wanted)
{
	/* Reset, and wait (bounded) for the device to show it is done. */
	mmio_write8(d->common + COMMON_STATUS, 0);
	for (int i = 0; i < 1000000 && virtio_status(d) != 0; i++)
		cpu_relax();
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);

	mmio_write32(d->common + COMMON_DFSELECT, 0);
	uint64_t lo = mmio_read32(d->common + COMMON_DF);
	mmio_write32(d->common + COMMON_DFSELECT, 1);
	uint64_t hi = mmio_read32(d->common + COMMON_DF);
	d->offered = hi << 32 | lo;
	d->features = d->offered & wanted;
	if (!(d->features & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		virtio_fail(d);
		return VIRTIO_ERR_FEATURES;
	}
	mmio_write32(d->common + COMMON_GFSELECT, 0);
	mmio_write32(d->common + COMMON_GF, (uint32_t)d->features);
	mmio_write32(d->common + COMMON_GFSELECT, 1);
	mmio_write32(d->common + COMMON_GF, (uint32_t)(d->features >> 32));
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		virtio_fail(d);
		return VIRTIO_ERR_FEATURES;
	}
	return 0;
}

void virtio_msix_route(struct virtio_pci_dev *d, unsigned entry, uint8_t vector)
{
	uint64_t e = d->msix_table + (uint64_t)entry * MSIX_ENTRY_SIZE;
	mmio_write32(e + 0, MSI_ADDRESS);
	mmio_write32(e + 4, 0);
	mmio_write32(e + 8, vector);
	mmio_write32(e + 12, 0);            /* unmask */
}

void virtio_msix_enable(struct virtio_pci_dev *d)
{
	unsigned at = d->msix_cap + MSIX_CONTROL;
	uint16_t control = pci_read16(d->bdf, at);
	pci_write16(d->bdf, at, (control | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK);
}

uint16_t virtio_config_vector(struct virtio_pci_dev *d, uint16_t entry)
{
	mmio_write16(d->common + COMMON_MSIX, entry);
	return mmio_read16(d->common + COMMON_MSIX);
}

static void write64(uint64_t addr, uint64_t v)
{
	mmio_write32(addr, (uint32_t)v);
	mmio_write32(addr + 4, (uint32_t)(v >> 32));
}

int virtq_init(struct virtio_pci_dev *d, struct virtq *q, uint16_t index, uint16_t max_size,
	       void *mem, uint16_t msix_entry)
{
	uint64_t c = d->common;
	mmio_write16(c + COMMON_Q_SELECT, index);
	uint16_t size = mmio_read16(c + COMMON_Q_SIZE);
	if (size == 0 || mmio_read16(c + COMMON_Q_ENABLE))
		return VIRTIO_ERR_QUEUE;
	if (size > max_size)
		size = max_size;
	while (size & (size - 1))       /* split rings are a power of two; be safe anyway */
		size &= size - 1;

	memset(q, 0, sizeof(*q));
	memset(mem, 0, VIRTQ_BYTES(size));
	uint64_t base = (uint64_t)mem;
	uint64_t avail = base + 16ul * size;
	uint64_t used = (avail + 6 + 2ul * size + 3) & ~3ul;
	q->index = index;
	q->size = size;
	q->event_idx = !!(d->features & VIRTIO_BIT(VIRTIO_F_EVENT_IDX));
	q->desc = (volatile struct virtq_desc *)base;
	q->avail = (volatile uint16_t *)avail;
	q->used = (volatile uint16_t *)used;
	q->used_ring = (volatile struct virtq_used_elem *)(used + 4);

	mmio_write16(c + COMMON_Q_SIZE, size);
	mmio_write16(c + COMMON_Q_MSIX, msix_entry);
	if (mmio_read16(c + COMMON_Q_MSIX) != msix_entry)
		return VIRTIO_ERR_QUEUE;
	write64(c + COMMON_Q_DESC, base);
	write64(c + COMMON_Q_DRIVER, avail);
	write64(c + COMMON_Q_DEVICE, used);
	uint64_t off = (uint64_t)mmio_read16(c + COMMON_Q_NOFF) * d->notify_mult;
	if (off + 2 > d->notify_len)
		return VIRTIO_ERR_QUEUE;
	q->notify_addr = d->notify + off;
	mmio_write16(c + COMMON_Q_ENABLE, 1);
	return 0;
}

uint8_t virtio_driver_ok(struct virtio_pci_dev *d)
{
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
	return virtio_status(d);
}

uint32_t virtio_config_read32(struct virtio_pci_dev *d, unsigned offset)
{
	uint8_t gen;
	uint32_t v;
	do {
		gen = mmio_read8(d->common + COMMON_CFGGEN);
		v = mmio_read32(d->device + offset);
	} while (gen != mmio_read8(d->common + COMMON_CFGGEN));
	return v;
}

uint64_t virtio_config_read64(struct virtio_pci_dev *d, unsigned offset)
{
	uint8_t gen;
	uint64_t v;
	do {
		gen = mmio_read8(d->common + COMMON_CFGGEN);
		v = mmio_read32(d->device + offset);
		v |= (uint64_t)mmio_read32(d->device + offset + 4) << 32;
	} while (gen != mmio_read8(d->common + COMMON_CFGGEN));
	return v;
}

/* ---- Split virtqueue ---- */

/* avail: flags, idx, ring[size], used_event. used: flags, idx, ring[size] (8 bytes each),
 * avail_event. */
#define AVAIL_IDX(q)        ((q)->avail[1])
#define USED_EVENT(q)       ((q)->avail[2 + (q)->size])
#define USED_FLAGS(q)       ((q)->used[0])
#define USED_IDX(q)         ((q)->used[1])
#define AVAIL_EVENT(q)      ((q)->used[2 + 4 * (q)->size])

void virtq_add(struct virtq *q, uint16_t head)
{
	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	q->avail_idx++;
}

int virtq_kick(struct virtq *q)
{
	/* Ring entries before the index (x86 keeps stores in order; stop the compiler). */
	barrier();
	AVAIL_IDX(q) = q->avail_idx;
	/* The index store must be visible before we read the device's suppression state. */
	mb();
	uint16_t old = q->kicked_idx, now = q->avail_idx;
	q->kicked_idx = now;
	if (old == now)
		return 0;
	int notify;
	if (q->event_idx)
		notify = (uint16_t)(now - AVAIL_EVENT(q) - 1) < (uint16_t)(now - old);
	else
		notify = !(USED_FLAGS(q) & VIRTQ_USED_F_NO_NOTIFY);
	if (notify) {
		mmio_write16(q->notify_addr, q->index);
		q->kicks++;
	}
	return notify;
}

int virtq_pop(struct virtq *q, uint32_t *id, uint32_t *len)
{
	if (q->last_used == USED_IDX(q))
		return 0;
	/* The entry is read after the index (loads stay in order on x86). */
	barrier();
	volatile struct virtq_used_elem *e = &q->used_ring[q->last_used & (q->size - 1)];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 1;
}

int virtq_arm(struct virtq *q)
{
	if (q->event_idx)
		USED_EVENT(q) = q->last_used;
	/* Publish used_event before looking at the used index once more; otherwise an entry
	 * added in between could come without an interrupt. */
	mb();
	return USED_IDX(q) != q->last_used;
}

int virtq_wait(struct virtq *q, uint64_t deadline)
{
	for (;;) {
		/* Interrupts are only taken inside sys_wait_irq, so one that arrives after this
		 * snapshot makes the wait return at once: no lost wake-up. */
		uint32_t seen = irq_total;
		if (virtq_arm(q))
			return 1;
		if ((int64_t)(rdtsc() - deadline) >= 0)
			return 0;
		sys_wait_irq(seen);
	}
}

void virtio_timer_start(void)
{
	/* 6.25e6 x 16 ns = 100 ms at KVM's 1 GHz APIC bus. */
	lapic_timer_periodic(VIRTIO_TIMER_VECTOR, 6250000);
}
