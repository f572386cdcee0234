/*
 * Virtio 1.x over PCI for the test guests: finding a function on bus 0, walking its
 * capabilities, the initialisation sequence, MSI-X, and split virtqueues. Device-independent;
 * a guest links virtio.c and adds its device's requests on top (see virtio-blk.c).
 *
 * Everything runs in ring 3 and touches the BARs directly (all of 0-4 GiB is identity mapped
 * and user-accessible); only BARs below 4 GiB are usable.
 */
#ifndef ISOLA_GUEST_VIRTIO_H
#define ISOLA_GUEST_VIRTIO_H

#include "rt.h"

#define VIRTIO_PCI_VENDOR           0x1af4
#define VIRTIO_PCI_DEVICE_BASE      0x1040      /* + virtio device id (modern devices) */

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE   0x01
#define VIRTIO_STATUS_DRIVER        0x02
#define VIRTIO_STATUS_DRIVER_OK     0x04
#define VIRTIO_STATUS_FEATURES_OK   0x08
#define VIRTIO_STATUS_NEEDS_RESET   0x40
#define VIRTIO_STATUS_FAILED        0x80

/* Transport feature bits. */
#define VIRTIO_F_INDIRECT_DESC      28
#define VIRTIO_F_EVENT_IDX          29
#define VIRTIO_F_VERSION_1          32
#define VIRTIO_BIT(n)               (1ull << (n))

#define VIRTIO_NO_VECTOR            0xffff

/* Split virtqueue descriptor flags. */
#define VIRTQ_DESC_F_NEXT           1
#define VIRTQ_DESC_F_WRITE          2
#define VIRTQ_DESC_F_INDIRECT       4
#define VIRTQ_USED_F_NO_NOTIFY      1

/* Failures of the helpers below (negative return values). */
#define VIRTIO_ERR_NO_DEVICE        (-1)  /* no such function on bus 0 */
#define VIRTIO_ERR_CAPS             (-2)  /* a required capability is missing or unusable */
#define VIRTIO_ERR_FEATURES         (-3)  /* no VERSION_1, or FEATURES_OK did not stick */
#define VIRTIO_ERR_QUEUE            (-4)  /* queue missing, already enabled or vector refused */

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* What virtio_pci_find() learns about a function. Region addresses are absolute. */
struct virtio_pci_dev {
	uint32_t bdf;
	uint16_t device_id;
	uint64_t common;            /* struct virtio_pci_common_cfg */
	uint64_t isr;
	uint64_t device;            /* device-specific configuration */
	uint32_t device_len;
	uint64_t notify;            /* notification region base */
	uint32_t notify_len;
	uint32_t notify_mult;       /* notify_off_multiplier */
	unsigned msix_cap;          /* config-space offset of the MSI-X capability */
	unsigned msix_vectors;      /* table size */
	uint64_t msix_table;
	uint64_t msix_pba;
	uint64_t offered;           /* device features */
	uint64_t features;          /* negotiated */
};

/* Bytes of guest memory a split virtqueue of `size` entries needs (see virtq_init). */
#define VIRTQ_BYTES(size) \
	((16ul * (size) + 6 + 2ul * (size) + 3) / 4 * 4 + 6 + 8ul * (size))

struct virtq {
	uint16_t index;
	uint16_t size;
	int event_idx;                      /* VIRTIO_F_EVENT_IDX negotiated */
	volatile struct virtq_desc *desc;
	volatile uint16_t *avail;           /* flags, idx, ring[size], used_event */
	volatile uint16_t *used;            /* flags, idx, then the ring; avail_event after it */
	volatile struct virtq_used_elem *used_ring;
	uint64_t notify_addr;
	uint16_t avail_idx;                 /* next avail index (driver's shadow) */
	uint16_t kicked_idx;                /* avail idx at the last notification check */
	uint16_t last_used;                 /* used entries consumed so far */
	uint32_t kicks;                     /* notifications actually sent */
};

/*
 * Scans bus 0 with configuration mechanism #1 for the `nth` (0-based) function with vendor
 * 0x1af4 and the given device id, enables memory decoding and bus mastering, and walks its
 * capability list for the common, notify, ISR and device-configuration structures and MSI-X.
 * Returns 0 or VIRTIO_ERR_*.
 */
int virtio_pci_find(uint16_t device_id, unsigned nth, struct virtio_pci_dev *d);

/*
 * Reset, ACKNOWLEDGE, DRIVER, read the device features, accept `wanted & offered` (which must
 * include VERSION_1), FEATURES_OK and check that it stuck. Leaves d->offered and d->features
 * set. Returns 0 or VIRTIO_ERR_FEATURES (after setting FAILED).
 */
int virtio_pci_negotiate(struct virtio_pci_dev *d, uint64_t wanted);

/* Programs MSI-X table entry `entry`: message to APIC id 0 (address 0xfee00000), data =
 * IDT `vector`, unmasked. */
void virtio_msix_route(struct virtio_pci_dev *d, unsigned entry, uint8_t vector);
/* Sets MSI-X Enable (and clears Function Mask) in the capability's Message Control. */
void virtio_msix_enable(struct virtio_pci_dev *d);
/* Sets config_msix_vector; returns what reads back (VIRTIO_NO_VECTOR if refused). */
uint16_t virtio_config_vector(struct virtio_pci_dev *d, uint16_t entry);

/*
 * Sets up queue `index` as a split virtqueue of min(device maximum, max_size) entries (a power
 * of two) in `mem` (zeroed here; 4 KiB aligned, VIRTQ_BYTES(max_size) bytes), with MSI-X table
 * entry `msix_entry` (checked by reading it back), and enables it. Call between FEATURES_OK
 * and DRIVER_OK. Returns 0 or VIRTIO_ERR_QUEUE.
 */
int virtq_init(struct virtio_pci_dev *d, struct virtq *q, uint16_t index, uint16_t max_size,
	       void *mem, uint16_t msix_entry);

/* Sets DRIVER_OK; returns the status read back afterwards. */
uint8_t virtio_driver_ok(struct virtio_pci_dev *d);
uint8_t virtio_status(struct virtio_pci_dev *d);
/* num_queues of the common configuration: how many queues the transport has. */
uint16_t virtio_num_queues(struct virtio_pci_dev *d);
/* Writes status FAILED (the driver gives up on the device). */
void virtio_fail(struct virtio_pci_dev *d);

/* Device configuration reads, repeated until config_generation is stable. */
uint32_t virtio_config_read32(struct virtio_pci_dev *d, unsigned offset);
uint64_t virtio_config_read64(struct virtio_pci_dev *d, unsigned offset);

/* Fills descriptor i. */
static inline void virtq_set_desc(struct virtq *q, uint16_t i, uint64_t addr, uint32_t len,
				  uint16_t flags, uint16_t next)
{
	q->desc[i].addr = addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

/* Puts chain `head` in the avail ring (the device sees it after the next virtq_kick). */
void virtq_add(struct virtq *q, uint16_t head);
/* Publishes the added chains and notifies the device unless it asked not to be (EVENT_IDX:
 * avail_event; otherwise VIRTQ_USED_F_NO_NOTIFY). Returns 1 if it notified. */
int virtq_kick(struct virtq *q);
/* Takes the next used entry, if any: 1 and *id, *len set, else 0. */
int virtq_pop(struct virtq *q, uint32_t *id, uint32_t *len);
/* Asks for an interrupt on the next used entry (EVENT_IDX: used_event = last_used) and
 * returns 1 if used entries are already waiting, so the caller must not sleep. */
int virtq_arm(struct virtq *q);

/*
 * Waits until the queue has a used entry (1) or the TSC passes `deadline` (0). Sleeps with
 * the wait-for-interrupt service; wake-ups that bring nothing (another vector, an interrupt for
 * entries already consumed) just go round again. Something must interrupt now and then for the
 * deadline to be noticed: the caller keeps a periodic LAPIC timer running (virtio_timer_start).
 */
int virtq_wait(struct virtq *q, uint64_t deadline);

/* IDT vector of the wake-up timer virtq_wait relies on; about 10 per second. */
#define VIRTIO_TIMER_VECTOR         0x30
void virtio_timer_start(void);

#endif
