"""mm.training"""
