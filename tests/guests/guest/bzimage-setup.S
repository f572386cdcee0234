/*
 * Real-mode part of a bzImage: the boot sector and setup header (Linux x86 boot protocol
 * 2.15, Documentation/arch/x86/boot.rst) followed by setup code that only halts. Isola never
 * runs it: it loads the protected-mode payload that follows these (SETUP_SECTS + 1) sectors
 * at 0x100000 and enters the 64-bit entry at 0x100200.
 *
 * Assembled with -DSYSSIZE=<payload size / 16, rounded up> -DINIT_SIZE=<bytes> (build.rs).
 */
#define SETUP_SECTS 1

	.code16
	.section .text, "ax", @progbits
	.globl _start
_start:
	/* Boot sector: not bootable. */
	cli
1:	hlt
	jmp 1b

	.org 0x1f1
setup_sects:	.byte SETUP_SECTS
root_flags:	.word 0
syssize:	.long SYSSIZE
ram_size:	.word 0
vid_mode:	.word 0xffff            /* NORMAL_VGA */
root_dev:	.word 0
boot_flag:	.word 0xaa55

	.org 0x200
jump:		.byte 0xeb, setup_code - (jump + 2)  /* jmp short setup_code */
header:		.ascii "HdrS"
version:	.word 0x020f
realmode_swtch:	.long 0
start_sys_seg:	.word 0x1000
kernel_version:	.word version_string - _start - 0x200
type_of_loader:	.byte 0
loadflags:	.byte 0x01              /* LOADED_HIGH */
setup_move_size: .word 0x8000
code32_start:	.long 0x100000
ramdisk_image:	.long 0
ramdisk_size:	.long 0
bootsect_kludge: .long 0
heap_end_ptr:	.word 0
ext_loader_ver:	.byte 0
ext_loader_type: .byte 0
cmd_line_ptr:	.long 0
initrd_addr_max: .long 0x7fffffff
kernel_alignment: .long 0x100000
relocatable_kernel: .byte 0
min_alignment:	.byte 20                /* log2(kernel_alignment) */
xloadflags:	.word 0x0001            /* XLF_KERNEL_64: 64-bit entry at code32_start + 0x200 */
cmdline_size:	.long 2047
hardware_subarch: .long 0
hardware_subarch_data: .quad 0
payload_offset:	.long 0
payload_length:	.long 0
setup_data:	.quad 0
pref_address:	.quad 0x100000
init_size:	.long INIT_SIZE
handover_offset: .long 0
kernel_info_offset: .long 0

setup_code:
	cli
1:	hlt
	jmp 1b

version_string:
	.asciz "isola test guest"

	.org (SETUP_SECTS + 1) * 512
