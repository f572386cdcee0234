/*
 * power: answers (or ignores) the ACPI power button without an AML interpreter. It routes
 * IOAPIC pin 5 (the GED's interrupt, as the DSDT's \_SB.GED _CRS says) to vector 0x35, waits
 * for interrupts, and on each one reads the GED's event register (port 0xb00; a read clears
 * it). Bit 0 set is a power-button press: `power.mode=answer` (the default) powers off
 * through ACPI S5; `power.mode=ignore` reports it and keeps waiting.
 * The output protocol is documented in ../src/lib.rs.
 */
#include "rt.h"

#define GED_PORT 0xb00
#define GED_IRQ 5
#define GED_EVENT_POWER_BUTTON 0x01
#define GED_VECTOR 0x35
#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define EXIT_POWER_BAD_PARAM 60

static void ioapic_write(uint32_t reg, uint32_t value)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, value);
}

void guest_main(void)
{
	char mode[16] = "answer";
	cmdline_get("power.mode", mode, sizeof mode);
	int answer = str_eq(mode, "answer");
	if (!answer && !str_eq(mode, "ignore")) {
		print("power: bad power.mode=%s\n", mode);
		debug_exit(EXIT_POWER_BAD_PARAM);
	}

	lapic_enable();
	/* Fixed delivery, physical destination APIC id 0, edge-triggered, active high, unmasked. */
	ioapic_write(IOAPIC_REDTBL(GED_IRQ) + 1, lapic_id() << 24);
	ioapic_write(IOAPIC_REDTBL(GED_IRQ), GED_VECTOR);
	print("power: ready mode=%s\n", mode);

	unsigned seen = 0, presses = 0;
	for (;;) {
		sys_wait_irq(seen);
		seen = irq_total;
		uint8_t events = inb(GED_PORT);
		if (!(events & GED_EVENT_POWER_BUTTON))
			continue;
		presses++;
		print("power: button pressed count=%u irqs=%u\n", presses,
		      (unsigned)irq_counts[GED_VECTOR]);
		if (answer) {
			print("power: powering off\n");
			poweroff();
		}
	}
}
