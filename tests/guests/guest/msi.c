/*
 * msi: enables the LAPIC, then reports each interrupt it receives (the host injects MSIs to
 * APIC id 0 with vectors 0x40-0x4f, one at a time) and powers off after eight.
 * The output protocol is documented in ../src/lib.rs.
 */
#include "rt.h"

#define MSI_EXPECTED 8

void guest_main(void)
{
	lapic_enable();
	print("msi: ready apic-id=%u\n", lapic_id());

	unsigned seen = 0;
	while (seen < MSI_EXPECTED) {
		/* Returns at once if an interrupt came in since we last looked. */
		sys_wait_irq(seen);
		unsigned total = irq_total;
		for (; seen < total && seen < MSI_EXPECTED; seen++)
			print("msi: vector=0x%02x count=%u\n", irq_log[seen % IRQ_LOG_SIZE], seen + 1);
	}
	print("msi: done total=%u\n", seen);
	poweroff();
}
