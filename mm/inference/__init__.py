"""mm.inference"""
