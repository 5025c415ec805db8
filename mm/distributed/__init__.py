"""mm.distributed"""
